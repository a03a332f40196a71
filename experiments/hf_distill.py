"""Distil a Hugging Face language model into a student cut from it, on your own data.

The teacher is a Hugging Face checkpoint (``--teacher.checkpoint DIR``:
config.json, safetensors, tokenizer; Llama, Mistral, Qwen 2/3, Gemma 2/3,
GPT-2). The student starts as every second layer of the teacher (DistilBERT's
initialisation; ``--student.layers 0 3 …`` or ``--student.layer_stride k`` to
choose, ``--student.mlp_size``/``--student.heads``/``--student.kv_heads`` to
prune its width too) and learns on a token dataset made by ``kdjax prepare
text`` (``--data.name``), scored on the responses only:

  forward_kl   forward KL(teacher ‖ student) per response token (the default)
  reverse_kl   reverse KL(student ‖ teacher), mode-seeking
  gkd          the generalized JSD, β = 0.5 (Agarwal et al. 2024)

Every cell trains 1,000 steps of 8 rows with AdamW (1e-4, cosine, 5 % warm-up,
gradients clipped at 1.0). On-policy training on the student's own samples
is one flag away: ``--responses.student_fraction 1 --responses.stop_tokens
EOS_ID``. The distilled student leaves as a Hugging Face checkpoint:
``kdjax export WORKDIR --format hf --out DIR``.
"""

from kdjax.config import DataConfig, Experiment, MethodConfig, ModelConfig, OptimConfig, RunConfig

STEPS = 1000


def _cell(name: str, method: MethodConfig) -> Experiment:
  return Experiment(
    name=f"hf_distill_{name}",
    mode="offline",
    teacher=ModelConfig(name="hf"),
    student=ModelConfig(name="hf", layer_stride=2),
    method=method,
    data=DataConfig(name="my_data", view="tokens", batch_size=8, eval_batch_size=8),
    optim=OptimConfig(
      name="adamw", lr=1e-4, weight_decay=0.01, schedule="cosine", warmup_epochs=0.05, steps=STEPS, clip_norm=1.0
    ),
    run=RunConfig(workdir=f"workdirs/hf_distill/{name}", eval_every=250, log_every=50),
  )


def get_config() -> Experiment:
  """Forward KL on the data's responses (the default cell)."""
  return _cell("forward_kl", MethodConfig(name="forward_kl"))


CONFIGS = {
  "forward_kl": get_config,
  "reverse_kl": lambda: _cell("reverse_kl", MethodConfig(name="reverse_kl")),
  "gkd": lambda: _cell("gkd", MethodConfig(name="gkd", gkd_beta=0.5)),
}
