"""PyTorch reference loops in a process of their own, for ``kdjax bench`` (:mod:`kdjax.bench_lm`,
:mod:`kdjax.bench_released`).

PyTorch run inside the same process as the JAX runtime is slower than alone
(two thread pools, two allocators), so the benchmark's fair PyTorch figures
come from a worker: this file run as a script (``python -P bench_torch.py``,
so neither kdjax nor JAX is imported there; the worker reports
``jax_imported``). It reads one JSON line that says what to build, then one
JSON command per line, and answers each with one JSON line:

  setup   ``{"kind": "kd", "pair", "batch", "threads"}``: the benchmark's eager KD loop
          (:class:`kdjax.bench.TorchCase`, the file loaded by path);
          ``{"kind": "hf_kd", "teacher", "student", "batch", "length", "threads"}``: the same loop
          on two Hugging Face ``Qwen2ForCausalLM`` made from config dicts (random weights):
          CE + per-token forward KL(teacher ‖ student), SGD with momentum;
          ``{"kind": "hf_generate", "config", "seed", "path", "prompts", "new_tokens", "threads"}``: a random
          ``Qwen2ForCausalLM`` of ``config``, saved at ``path`` (``save_pretrained``) for kdjax to load,
          and its ``model.generate`` on the ``(B, P)`` prompts, greedy or sampled
  ``{"run": n, "sample": bool}``  n steps (or generate calls); answers ``{"seconds"}``
  ``{"tokens": true}``            the last generated tokens ``(B, N)`` (``hf_generate``)
  ``{"info": true}``              ``peak_rss_bytes`` (:func:`peak_rss_bytes`), ``jax_imported``, ``torch``,
                                  ``threads``, ``loss`` (the last KD loss)

:class:`TorchWorker` starts and drives one from the benchmark's process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time


class TorchWorker:
  """A worker process (this file) built from ``setup``; ``run(steps)`` returns the worker's own seconds.

  The worker imports torch and builds its loop while the caller goes on (e.g. compiling kdjax's step);
  the first command waits for it to be ready.
  """

  def __init__(self, setup: dict):
    self.proc = subprocess.Popen(
      [sys.executable, "-P", os.path.abspath(__file__)],
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      text=True,
      bufsize=1,
    )
    self._send(setup)
    self.ready = None

  def _send(self, cmd: dict) -> None:
    self.proc.stdin.write(json.dumps(cmd) + "\n")
    self.proc.stdin.flush()

  def _answer(self, cmd: dict) -> dict:
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f"the PyTorch worker exited (status {self.proc.wait()}) on {cmd}")
    out = json.loads(line)
    if "error" in out:
      raise RuntimeError(f"PyTorch worker: {out['error']}")
    return out

  def call(self, cmd: dict) -> dict:
    """Send one command and wait for its answer (an error in the worker is raised here)."""
    if self.ready is None:
      self.ready = self._answer("setup")
    self._send(cmd)
    return self._answer(cmd)

  def run(self, steps: int, **kw) -> float:
    return self.call({"run": steps, **kw})["seconds"]

  def close(self) -> dict:
    """The worker's ``info``, then its exit."""
    info = self.call({"info": True})
    self.proc.stdin.close()
    self.proc.wait(timeout=60)
    return info


# --------------------------------------------------------------------------- the worker side (torch only)


def _load_bench():
  """kdjax/bench.py loaded by path (its top level imports the standard library only): no kdjax package."""
  import importlib.util

  spec = importlib.util.spec_from_file_location("kdjax_bench_file", os.path.join(os.path.dirname(__file__), "bench.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


class _HfKd:
  """CE + per-token forward KL(teacher ‖ student) at T = 1 on two random Qwen2 models, eager, SGD."""

  def __init__(self, s: dict):
    import torch
    import transformers as T

    bench = _load_bench()
    torch.manual_seed(0)
    self.teacher = T.Qwen2ForCausalLM(T.Qwen2Config(**s["teacher"])).eval()
    self.student = T.Qwen2ForCausalLM(T.Qwen2Config(**s["student"])).train()
    for p in self.teacher.parameters():
      p.requires_grad_(False)
    self.opt = torch.optim.SGD(self.student.parameters(), lr=bench.LR, momentum=bench.MOMENTUM)
    self.ce_w, self.kd_w = bench.CE_WEIGHT, bench.KD_WEIGHT
    tokens = torch.randint(0, s["student"]["vocab_size"], (s["batch"], s["length"] + 1))
    self.x, self.y = tokens[:, :-1], tokens[:, 1:]
    self.torch, self.loss = torch, None

  def step(self):
    torch, F = self.torch, self.torch.nn.functional
    with torch.no_grad():
      t = self.teacher(input_ids=self.x).logits.flatten(0, 1)
    s = self.student(input_ids=self.x).logits.flatten(0, 1)
    ls = F.log_softmax(s.float(), -1)
    kd = F.kl_div(ls, F.log_softmax(t.float(), -1), reduction="batchmean", log_target=True)
    loss = self.ce_w * F.nll_loss(ls, self.y.flatten()) + self.kd_w * kd
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    self.opt.step()
    return loss

  def run(self, steps: int, **_) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
      loss = self.step()
    self.loss = float(loss.item())
    return time.perf_counter() - t0


class _HfGenerate:
  """``model.generate`` of a random Qwen2 model (saved at ``path`` first): new tokens only, no stop token, greedy or
  temperature 1."""

  def __init__(self, s: dict):
    import torch
    import transformers as T

    torch.manual_seed(s.get("seed", 0))
    self.model = T.Qwen2ForCausalLM(T.Qwen2Config(**s["config"])).eval()
    self.model.save_pretrained(s["path"])  # what kdjax loads: the same weights
    self.prompts = torch.tensor(s["prompts"], dtype=torch.long)
    self.n, self.torch, self.tokens, self.loss = s["new_tokens"], torch, None, None
    self.T = T

  def run(self, steps: int, sample: bool = False, seed: int = 0) -> float:
    torch = self.torch
    drawn = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0} if sample else {"do_sample": False}
    cfg = self.T.GenerationConfig(max_new_tokens=self.n, eos_token_id=None, pad_token_id=0, use_cache=True, **drawn)
    t0 = time.perf_counter()
    with torch.inference_mode():
      for i in range(steps):
        torch.manual_seed(seed + i)
        out = self.model.generate(self.prompts, attention_mask=torch.ones_like(self.prompts), generation_config=cfg)
    self.tokens = out[:, self.prompts.shape[1] :].tolist()
    return time.perf_counter() - t0


def _build(s: dict):
  import torch

  if s.get("threads"):
    torch.set_num_threads(s["threads"])
  if s["kind"] == "kd":
    case = _load_bench().TorchCase(s["pair"], s["batch"], s.get("threads", 0))
    case.loss = None
    return case
  return {"hf_kd": _HfKd, "hf_generate": _HfGenerate}[s["kind"]](s)


def peak_rss_bytes() -> int:
  """This process's peak resident memory: Linux's VmHWM (the peak of this program's own address space), else
  ``resource.getrusage``'s ``ru_maxrss`` (which on Linux keeps the parent's peak across fork and exec)."""
  import resource

  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _answer(case, cmd: dict) -> dict:
  import torch

  if "run" in cmd:
    return {"seconds": case.run(cmd["run"], **{k: v for k, v in cmd.items() if k != "run"})}
  if "tokens" in cmd:
    return {"tokens": case.tokens}
  return {
    "peak_rss_bytes": peak_rss_bytes(),
    "jax_imported": "jax" in sys.modules,
    "torch": torch.__version__,
    "threads": torch.get_num_threads(),
    "loss": getattr(case, "loss", None),
  }


def _serve() -> None:
  case = None
  for line in sys.stdin:
    cmd = json.loads(line)
    try:
      if case is None:
        case = _build(cmd)
        out = {"ready": True, "jax_imported": "jax" in sys.modules}
      else:
        out = _answer(case, cmd)
    except Exception as e:  # reported to the benchmark, which raises it there
      out = {"error": f"{type(e).__name__}: {e}"}
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
  _serve()
