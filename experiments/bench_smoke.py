"""Each CLI's smoke run, timed: CPU and wall seconds against the one-minute budget.

  python experiments/bench_smoke.py [--rounds 2] [--names quickstart,oracle]

Every CLI runs `--config.smoke=True` as a newcomer starts it: a subprocess with no dataset
(empty TFDS and Fashion-MNIST directories), so it reads generated data. The first round
fills the persistent compilation cache (unless it was full already), the later ones read
it; each round's CPU seconds (user + system of the subprocess) and wall seconds are printed
with whether the CPU seconds met the budget, and the load average at the start, since the
wall time on a shared machine depends on the other jobs. The tests only check that the
smoke runs work (`tests/test_newcomer.py`); their cost belongs here.
"""

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time

CLIS = ("quickstart", "vgg19_cifar", "resnet32_cifar", "unstructured", "resnet50_imagenet",
        "vit_b16_imagenet", "oracle", "compare_criteria", "smollm2_wordnet", "minilm_wordnet")
BUDGET_S = 60.0


def cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  return usage.ru_utime + usage.ru_stime


def smoke_run(name: str, env: dict) -> tuple[int, float, float]:
  """(exit code, CPU seconds, wall seconds) of one smoke run in a fresh workdir."""
  with tempfile.TemporaryDirectory() as workdir:
    start, cpu = time.perf_counter(), cpu_seconds()
    out = subprocess.run([sys.executable, "-m", f"oba_jax.experiments.{name}",
                          f"--workdir={workdir}", "--config.smoke=True",
                          "--config.progress=False"], capture_output=True, text=True, env=env)
    return out.returncode, cpu_seconds() - cpu, time.perf_counter() - start


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--names", default=",".join(CLIS))
  args = parser.parse_args()
  names = [n for n in args.names.split(",") if n]
  unknown = sorted(set(names) - set(CLIS))
  if unknown:
    parser.error(f"--names: unknown {unknown}; accepted: {list(CLIS)}")
  with tempfile.TemporaryDirectory() as empty:
    env = dict(os.environ, TFDS_DATA_DIR=empty, OBA_FASHION_MNIST_DIR=empty, JAX_PLATFORMS="cpu")
    print(f"budget {BUDGET_S:.0f} CPU s; {os.cpu_count()} cores")
    print(f"{'round':>5} {'cli':<18} {'exit':>4} {'cpu s':>7} {'wall s':>7} {'load':>5} budget")
    for round_ in range(1, args.rounds + 1):
      for name in names:
        load = os.getloadavg()[0]
        code, cpu, wall = smoke_run(name, env)
        met = "met" if code == 0 and cpu <= BUDGET_S else "MISSED"
        print(f"{round_:>5} {name:<18} {code:>4} {cpu:>7.1f} {wall:>7.1f} {load:>5.1f} {met}",
              flush=True)


if __name__ == "__main__":
  main()
