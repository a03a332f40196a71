"""The hidden-Markov language (``hmm_lm``): its true next-token distribution equals brute-force enumeration,
its samples follow it, the exact sequence metrics equal a NumPy re-computation, and the dataset loads by name."""

from __future__ import annotations

import functools
import itertools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import data as kd
from kdjax.data.builders import hmm as H
from kdjax.engine import evaluation as ev

TINY = next(c for c in H.HmmLm.BUILDER_CONFIGS if c.name == "tiny")
SYMBOLS = list(range(H.FIRST_SYMBOL, H.vocab_size(TINY)))
TINY_HMM = H.make_hmm(TINY)


@pytest.fixture(scope="module")
def tiny() -> H.Hmm:
  return TINY_HMM


def joint(m: H.Hmm, seq) -> float:
  """p(x_1 … x_n) by summing over every hidden path (no recursion shared with the code under test)."""
  assert m is TINY_HMM
  return _joint(tuple(int(v) for v in seq))


@functools.cache
def _joint(seq: tuple) -> float:
  m = TINY_HMM
  k = len(m.init)
  total = 0.0
  for path in itertools.product(range(k), repeat=len(seq)):
    p = m.init[path[0]] * m.emit[path[0], seq[0]]
    for t in range(1, len(seq)):
      p *= m.trans[path[t - 1], path[t]] * m.emit[path[t], seq[t]]
    total += p
  return total


def test_tables_are_distributions(tiny):
  for table in (tiny.init[None], tiny.trans, tiny.emit):
    np.testing.assert_allclose(table.sum(-1), 1.0, atol=1e-12)
  assert (tiny.emit[:, : H.FIRST_SYMBOL] == 0).all()  # <pad> and <bos> are never emitted


def test_next_token_distribution_equals_enumeration(tiny):
  n = 4
  seqs = np.asarray(list(itertools.product(SYMBOLS, repeat=n)), np.int32)  # every symbol sequence of length 4
  rows = np.concatenate([np.full((len(seqs), 1), H.BOS, np.int32), seqs], axis=1)  # <bos> x_1 … x_4
  got = np.asarray(jax.jit(lambda x: H.next_token_logprobs(tiny, x))(rows), np.float64)  # (B, 5, V)
  for i in range(0, len(seqs), 7):  # a spread of prefixes
    for t in range(n + 1):  # the token after <bos> x_1 … x_t
      prefix = list(seqs[i, :t])
      p_prefix = joint(tiny, prefix) if t else 1.0
      want = [joint(tiny, prefix + [v]) / p_prefix for v in SYMBOLS]
      np.testing.assert_allclose(np.exp(got[i, t, SYMBOLS]), want, rtol=1e-4, atol=1e-6)
      assert np.all(np.isneginf(got[i, t, : H.FIRST_SYMBOL]))


def test_sampling_frequencies_match_the_distribution(tiny):
  """Chi-square goodness of fit of 20,000 sequences of length 3 against their enumerated probabilities."""
  seqs = H.sample(tiny, 20_000, 3, np.random.default_rng(0))
  support = list(itertools.product(SYMBOLS, repeat=3))
  probs = np.asarray([joint(tiny, list(s)) for s in support])
  np.testing.assert_allclose(probs.sum(), 1.0, atol=1e-12)
  index = {s: i for i, s in enumerate(support)}
  counts = np.bincount([index[tuple(r)] for r in seqs.tolist()], minlength=len(support))
  expected = probs * len(seqs)
  stat = float(np.sum((counts - expected) ** 2 / expected))
  try:
    from scipy import stats

    p_value = float(stats.chi2.sf(stat, df=len(support) - 1))
  except ImportError:  # Wilson–Hilferty: the chi-square quantile from the normal one
    d = len(support) - 1
    z = ((stat / d) ** (1 / 3) - (1 - 2 / (9 * d))) / np.sqrt(2 / (9 * d))
    p_value = float(0.5 * math.erfc(z / math.sqrt(2)))
  assert p_value > 0.001, (stat, p_value)
  assert abs(stat - (len(support) - 1)) < 5 * np.sqrt(2 * (len(support) - 1))  # not suspiciously far either side


def test_true_kl_sum_matches_numpy():
  rng = np.random.default_rng(1)
  p = rng.dirichlet(np.ones(5), size=(2, 3))
  p[..., :2] = 0.0  # tokens the language never emits
  p /= p.sum(-1, keepdims=True)
  logits = rng.normal(size=(2, 3, 5))
  mask = np.asarray([[1, 0, 1], [1, 1, 0]], np.float32)
  with np.errstate(divide="ignore"):
    true_logp = np.log(p)
  q = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  want = sum(
    mask[b, t] * sum(p[b, t, v] * np.log(p[b, t, v] / q[b, t, v]) for v in range(5) if p[b, t, v] > 0)
    for b in range(2)
    for t in range(3)
  )
  got = ev.true_kl_sum(jnp.asarray(true_logp, jnp.float32), jnp.asarray(logits, jnp.float32), jnp.asarray(mask))
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_sequence_metrics_of_a_fixed_logit_model_match_numpy(tiny):
  """A hand-made "model" that ignores its context (fixed logits over the symbols): its samples' log-likelihood
  under the truth and the sample estimate of KL(model ‖ true) equal the same sums over enumerated joints, and
  the estimate is near the exact sequence-level KL over every continuation."""
  rng = np.random.default_rng(2)
  q = np.asarray([0.6, 0.3, 0.1])  # over SYMBOLS
  prompts = np.asarray([[H.BOS, 2, 3], [H.BOS, 4, 4], [H.BOS, 3, 2]], np.int32)
  lengths = np.full(3, 3, np.int32)
  n, draws = 3, 400
  samples = np.asarray(SYMBOLS)[rng.choice(3, p=q, size=(3 * draws, n))]
  rep_prompts, rep_lengths = np.repeat(prompts, draws, 0), np.repeat(lengths, draws)
  score = jax.jit(lambda p, n, y: ev.continuation_true_logprobs(tiny, p, n, y))
  got = np.asarray(score(jnp.asarray(rep_prompts), jnp.asarray(rep_lengths), jnp.asarray(samples)))
  model_lp = np.log(q[samples - H.FIRST_SYMBOL]).sum(1)
  est = (model_lp - got.sum(1)).reshape(3, draws).mean(1)
  for i, prompt in enumerate(prompts):
    x = list(prompt[1:])
    px = joint(tiny, x)
    want_lp = [np.log(joint(tiny, x + list(y)) / px) for y in samples[i * draws : (i + 1) * draws]]
    np.testing.assert_allclose(got[i * draws : (i + 1) * draws].sum(1), want_lp, rtol=1e-4, atol=1e-5)
    exact = 0.0
    for y in itertools.product(range(3), repeat=n):
      qy = np.prod(q[list(y)])
      exact += qy * (np.log(qy) - np.log(joint(tiny, x + [SYMBOLS[j] for j in y]) / px))
    assert abs(est[i] - exact) < 0.15, (est[i], exact)  # Monte Carlo over 400 draws


def test_distinct_n_counts_unique_ngrams():
  t = np.asarray([[1, 2, 1, 2, 1], [3, 3, 3, 3, 3]])
  grams = [tuple(r[i : i + 2]) for r in t.tolist() for i in range(4)]
  assert ev.distinct_n(t, 2) == len(set(grams)) / len(grams) == 3 / 8


def test_dataset_builds_and_loads_by_name(tfds_dir):
  spec = kd.get_info("hmm_lm/tiny", tfds_dir)
  assert spec.num_classes == H.vocab_size(TINY) == 5 and spec.image_shape == (6,)
  assert kd.default_view("hmm_lm/tiny").kind == "tokens"
  train, test = (kd.load_arrays("hmm_lm/tiny", s, tfds_dir) for s in ("train", "test"))
  assert len(train) == 200 and len(test) == 50
  x, y = train.images, train.labels
  assert (x[:, 0] == H.BOS).all() and (x[:, 1:] >= H.FIRST_SYMBOL).all()
  assert (y[:, : TINY.prompt_length] == -1).all()
  np.testing.assert_array_equal(y[:, TINY.prompt_length : -1], x[:, TINY.prompt_length + 1 :])
  assert H.truth("hmm_lm/tiny") is H.truth("hmm_lm/tiny") and H.truth("arithmetic") is None


@pytest.mark.slow
def test_one_cell_through_the_cli_writes_the_exact_metrics(tmp_path, tfds_dir):
  """Two steps of a teacher and of an on-policy student on the tiny language: the exact metrics land in
  results.json with values in their ranges."""
  from kdjax import cli

  common = ["--data.name", "hmm_lm/tiny", "--data.data_dir", tfds_dir, "--data.eval_batch_size", "50"]
  common += ["--data.batch_size", "16", "--optim.steps", "2", "--run.eval_every", "2", "--run.quiet"]
  teacher = tmp_path / "teacher"
  argv = ["train-teacher", "hmm_lm", "--student.name", "lm_1x32", "--run.workdir", str(teacher), *common]
  assert cli.main(argv) == 0
  student = tmp_path / "student"
  argv = ["distill", "hmm_lm", "onpolicy_rkl_1", "--teacher.name", "lm_1x32", "--teacher.checkpoint", str(teacher)]
  assert cli.main([*argv, "--run.workdir", str(student), *common]) == 0
  t, s = (json.loads((d / "results.json").read_text()) for d in (teacher, student))
  assert "true_teacher_kl" not in t and s["true_teacher_kl"] >= 0.0
  for res in (t, s):
    for k in ("true_student_kl", "sample_reverse_kl"):
      assert 0.0 <= res[k] < 5.0, (k, res[k])
    for k in ("sample_true_nll", "greedy_true_nll", "sample_entropy", "true_entropy"):
      assert 0.0 < res[k] < 10.0, (k, res[k])
    assert 0.0 < res["sample_distinct_4"] <= 1.0 and 0.0 < res["greedy_distinct_4"] <= 1.0
  assert s["true_entropy"] == t["true_entropy"]  # a property of the held-out data alone
  from kdjax import report

  md = report.make_report([str(tmp_path)], str(tmp_path / "page.md"), baseline="hmm_lm_onpolicy_rkl_1")
  assert (
    "| hmm_lm_onpolicy_rkl_1 | 1 |" in md
    and "| hmm_lm_teacher | 1 |" in md
    and (tmp_path / "page_exact.png").read_bytes()[:4] == b"\x89PNG"
  )


def test_intervals_and_paired_comparison_match_scipy():
  stats = pytest.importorskip("scipy.stats")
  from kdjax.report import compare

  a = {0: 0.31, 1: 0.29, 2: 0.35, 3: 0.30, 4: 0.33}
  b = {0: 0.28, 1: 0.27, 2: 0.31, 3: 0.30, 4: 0.29, 5: 0.5}  # seed 5 has no pair: left out
  mean, half, p, n = compare.paired_t(a, b)
  d = np.asarray([a[s] - b[s] for s in range(5)])
  assert n == 5 and mean == pytest.approx(d.mean())
  assert p == pytest.approx(stats.ttest_rel([a[s] for s in range(5)], [b[s] for s in range(5)]).pvalue)
  assert half == pytest.approx(stats.t.ppf(0.975, 4) * d.std(ddof=1) / np.sqrt(5))
  m, h, k = compare.mean_ci(list(a.values()))
  lo, hi = stats.t.interval(0.95, 4, loc=np.mean(list(a.values())), scale=stats.sem(list(a.values())))
  assert k == 5 and m - h == pytest.approx(lo) and m + h == pytest.approx(hi)


def test_regenerated_page_keeps_the_reading(tmp_path):
  from kdjax.report import compare

  page = tmp_path / "r.md"
  compare.write_between_markers(page, "| old table |", title="# Title")
  text = page.read_text() + "\n## Reading\n\nwords a person wrote\n"
  page.write_text(text.replace("# Title", "# Title\n\nan introduction"))
  compare.write_between_markers(page, "| new table |", title="# Title")
  out = page.read_text()
  assert "| new table |" in out and "| old table |" not in out
  assert out.startswith("# Title\n\nan introduction") and out.endswith("words a person wrote\n")


def test_every_method_cell_shares_the_budget_and_the_script_runs_them_all():
  """Only the objective (method, responses), the name and the workdir differ between the table's cells."""
  import re
  from pathlib import Path

  from kdjax import config
  from kdjax.cli.experiments import load_experiment

  exp = load_experiment("hmm_lm")
  cells = {n: exp.CONFIGS[n]() for n in exp.METHODS}
  assert len(cells) == 13 and exp.get_config() == cells["fkl"]

  def shared(c):
    d = config.to_dict(c)
    del d["name"], d["method"], d["responses"], d["run"]["workdir"]
    return d

  assert all(shared(c) == shared(cells["fkl"]) for c in cells.values())
  assert len({(c.method, c.responses) for c in cells.values()}) == 13
  script = (Path(__file__).resolve().parents[1] / "scripts" / "lm_experiment.sh").read_text()
  assert re.search(r"^CELLS=(\S+)$", script, re.M).group(1).split(",") == exp.METHODS
