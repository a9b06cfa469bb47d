"""Plant plausible math bugs one at a time in a copy of the tree and check that the test meant for each fails.

    python scripts/plant_bugs.py            # each bug planted: every row must say "caught"
    python scripts/plant_bugs.py --clean    # the same tests on the unchanged copy: every row must say "passes"

Each row is one line of the algorithm code changed to a wrong formula that still runs (a sign, a sigma index, a
flag ignored), and the test written for it (issue 19: these got through the suite before those tests existed).
Prints a markdown table; exits non-zero if a bug got through (or, with --clean, if a test failed on correct code).
"""

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (what is planted, file, correct line, planted line, the test that must fail on it)
BUGS = [
    ("Flow-GRPO's KL term subtracted", "flow_grpo.py",
     "loss = loss + kl_beta * kl.mean()", "loss = loss - kl_beta * kl.mean()",
     "tests/test_flow_grpo.py::test_the_kl_term_pulls_the_policy_toward_the_reference"),
    ("DGPO's KL term subtracted", "dgpo.py",
     "loss = loss + kl_beta * kl\n", "loss = loss - kl_beta * kl\n",
     "tests/test_dgpo.py::test_the_kl_term_pulls_the_policy_toward_the_reference"),
    ("DGPO rolls out from theta_minus before --ema-start", "dgpo.py",
     "if it >= args.ema_start else", "if it < args.ema_start else",
     "tests/test_dgpo.py::test_rollouts_come_from_theta_minus_only_after_ema_start"),
    ("Neighbor GRPO ignores --quasi-norm-p (always 2)", "neighbor_grpo.py",
     "                                           args.quasi_norm_p)", "                                           2.0)",
     "tests/test_neighbor_grpo.py::test_the_loop_reweights_with_the_quasi_norm_p_it_is_given"),
    ("G2RPO trains the velocity at sigma_{k+1}", "g2rpo.py",
     "v = policy.velocity(anchor[k], sigmas[k], cond)", "v = policy.velocity(anchor[k], sigmas[k + 1], cond)",
     "tests/test_g2rpo.py::test_the_ratio_is_exactly_one_at_the_first_update_of_an_iteration"),
    ("Pro-GRPO's proxy x0_hat = x - (1 - s) v", "pro_grpo.py",
     "x0_hat = x - sigmas[j].float() * v", "x0_hat = x - (1 - sigmas[j].float()) * v",
     "tests/test_pro_grpo.py::test_pruned_trajectories_cost_nothing_and_the_proxy_costs_no_model_call"),
    ("SDE std sqrt((1 - s) / s) for sqrt(s / (1 - s))", "common.py",
     "std = noise_level * torch.sqrt(s / (1 - torch.where(s == 1, s_next, s)))",
     "std = noise_level * torch.sqrt((1 - torch.where(s == 1, s_next, s)) / s)",
     "tests/test_samplers.py::test_sde_std_formula_and_first_step_convention"),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clean", action="store_true", help="plant nothing: the tests must pass on the copy")
    clean = parser.parse_args().clean
    print("| planted bug | test | result |\n| --- | --- | --- |", flush=True)
    wrong = 0
    with tempfile.TemporaryDirectory() as tmp:
        for name, file, correct, planted, test in BUGS:
            tree = Path(tmp) / "tree"
            shutil.rmtree(tree, ignore_errors=True)
            shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(".git", ".venv*", ".cache", "runs", "results",
                                                                      "__pycache__"))
            source = (tree / file).read_text()
            if source.count(correct) != 1:  # the code moved on: this row must be updated, not skipped
                sys.exit(f"{file} no longer holds the line {correct.strip()!r} exactly once: update BUGS")
            if not clean:
                (tree / file).write_text(source.replace(correct, planted))
            start = time.time()
            failed = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", test],
                                    cwd=tree, capture_output=True).returncode != 0
            result = ("caught" if failed else "NOT CAUGHT") if not clean else ("FAILS" if failed else "passes")
            wrong += result in ("NOT CAUGHT", "FAILS")
            print(f"| {name + (' (none planted)' if clean else '')} | `{test.split('::')[1]}` | {result} "
                  f"({time.time() - start:.0f} s) |", flush=True)
    sys.exit(1 if wrong else 0)


if __name__ == "__main__":
    main()
