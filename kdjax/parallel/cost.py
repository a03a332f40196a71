"""A cost model for teacher placement: predicted step time and memory per device, and which to use.

Inputs are what one can measure on one device: the work of the teacher's
forward and of the student's step on a global batch (FLOPs, e.g. from XLA's
cost analysis), the rate each achieves on one device, how many devices
really compute at once (``parallelism``: the device count on GPUs and TPUs;
about 1 for forced host devices, which share the CPU's cores), the
device-to-device bandwidth, and the bytes involved. For ``n`` devices:

  colocated     t = (F_T / r_T + F_S / r_S) / p(n)
                mem = W_T + W_S
  sharded (m)   t = colocated + C_tp · 2(m − 1) / (n · bw)
                mem = W_T / m + W_S
  split (k, m)  t = max(F_T / (r_T p(k)) + tp(k, m), F_S / (r_S p(n − k)), colocated) + O / (n − k) / bw
                mem = W_T / m on teacher devices, W_S on student devices

with ``p(k) = min(k, parallelism)``, ``W_T`` the teacher's parameter bytes,
``W_S`` the student's state bytes (parameters, optimizer, adapters), ``O``
the bytes of teacher outputs crossing to the student per batch and ``C_tp``
the bytes a tensor-parallel teacher all-reduces per batch (the outputs of its
row-parallel layers). The split pipeline holds one batch in flight, so its
step takes as long as its slower stage, and never less than the whole work
on the devices that really run at once. Activations and XLA's scratch
memory are not modelled: memory figures are the parameters' and state's.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Workload:
  """One step's work and bytes, for the global batch.

  Attributes:
    teacher_flops: the teacher's forward.
    student_flops: the student's step without the teacher (forward,
      backward, optimizer update, method).
    teacher_bytes: the teacher's parameters (and statistics).
    student_bytes: the student's train state (parameters, optimizer state,
      adapters, method state).
    output_bytes: the teacher outputs the method reads (logits, features).
    tp_bytes: bytes all-reduced by a tensor-parallel teacher forward.
  """

  teacher_flops: float
  student_flops: float
  teacher_bytes: float
  student_bytes: float
  output_bytes: float = 0.0
  tp_bytes: float = 0.0


@dataclasses.dataclass(frozen=True)
class Rates:
  """Measured on the machine.

  Attributes:
    teacher_flops_per_s / student_flops_per_s: FLOP/s the teacher's forward
      and the student's step achieve on one device.
    parallelism: devices that compute at once (n for accelerators).
    link_bytes_per_s: device-to-device copy bandwidth.
    device_memory: bytes per device (0: unknown, everything fits).
  """

  teacher_flops_per_s: float
  student_flops_per_s: float
  parallelism: float
  link_bytes_per_s: float
  device_memory: float = 0.0


@dataclasses.dataclass(frozen=True)
class Prediction:
  placement: str  # "colocated", "sharded m=4", "split 2+6 m=1"
  teacher_devices: int
  model: int
  step_seconds: float
  teacher_bytes_per_device: float
  student_bytes_per_device: float
  fits: bool


def _p(k: int, rates: Rates) -> float:
  return min(float(k), rates.parallelism)


def predict(w: Workload, rates: Rates, devices: int, *, teacher_devices: int = 0, model: int = 1) -> Prediction:
  """Step time and memory per device of one placement (see the module docstring for the formulas)."""
  t_teacher, t_student = w.teacher_flops / rates.teacher_flops_per_s, w.student_flops / rates.student_flops_per_s
  together = (t_teacher + t_student) / _p(devices, rates)
  tp = lambda k: w.tp_bytes * 2 * (model - 1) / (k * rates.link_bytes_per_s)  # noqa: E731
  if teacher_devices:
    k, rest = teacher_devices, devices - teacher_devices
    stages = max(t_teacher / _p(k, rates) + tp(k), t_student / _p(rest, rates), together)
    step = stages + w.output_bytes / rest / rates.link_bytes_per_s
    name = f"split {k}+{rest} m={model}"
    t_mem, s_mem = w.teacher_bytes / model, w.student_bytes
    fits = not rates.device_memory or max(t_mem, s_mem) <= rates.device_memory
  else:
    step = together + (tp(devices) if model > 1 else 0.0)
    name = f"sharded m={model}" if model > 1 else "colocated"
    t_mem, s_mem = w.teacher_bytes / model, w.student_bytes
    fits = not rates.device_memory or t_mem + s_mem <= rates.device_memory
  return Prediction(name, teacher_devices, model, step, t_mem, s_mem, fits)


def candidates(devices: int) -> list[tuple[int, int]]:
  """Every ``(teacher_devices, model)``: colocated, sharded over each divisor, each split of the devices."""
  divisors = lambda n: [d for d in range(1, n + 1) if n % d == 0]  # noqa: E731
  out = [(0, m) for m in divisors(devices)]
  out += [(k, m) for k in range(1, devices) for m in divisors(k)]
  return out


def recommend(w: Workload, rates: Rates, devices: int) -> tuple[Prediction, list[Prediction]]:
  """The fastest placement that fits (the simplest among equals), and every prediction, fastest first."""
  preds = sorted(
    (predict(w, rates, devices, teacher_devices=k, model=m) for k, m in candidates(devices)),
    key=lambda p: (not p.fits, round(p.step_seconds, 12), p.teacher_devices, p.model),
  )
  return preds[0], preds
