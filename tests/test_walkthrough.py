"""tools/walkthrough.py teaches the real code path, and docs/walkthrough.md is what it prints today."""
import difflib
import json
import re
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from conftest import ROOT
from rm import RewardModel
from support.errors import UserError
from tools import walkthrough
from train import train

DOC = ROOT / "docs" / "walkthrough.md"
REGENERATE = "python -m tools.walkthrough --markdown > docs/walkthrough.md"
NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?")


def last_digit_apart(a: str, b: str) -> bool:
    """Two decimals printed at the same precision, at most one unit of their last digit apart."""
    (mantissa_a, _, exponent_a), (mantissa_b, _, exponent_b) = a.partition("e"), b.partition("e")
    places = len(mantissa_a.partition(".")[2])
    if not places or places != len(mantissa_b.partition(".")[2]) or exponent_a != exponent_b:
        return False
    return abs(float(mantissa_a) - float(mantissa_b)) <= 1.01 * 10 ** -places


def close_after_training(a: str, b: str) -> bool:
    """Two numbers of the trained stage: counts equal, decimals within 0.03 + 3%."""
    if "." not in a + b:
        return a == b
    return abs(float(a) - float(b)) <= 0.03 + 0.03 * abs(float(b))


def drift(expected: str, actual: str) -> str:
    """A diff of the page against the output, or "" when they match. The words must match exactly, and so
    must every number, except that a printed decimal may be one unit off in its last digit: another CPU's
    kernels add in another order, and a value within a rounding error of a boundary then prints one digit
    apart. After a hundred steps of training (the section "After training") such differences have grown:
    there a decimal may be 0.03 + 3% apart, and counts must still match."""
    old, new = expected.splitlines(), actual.splitlines()
    diff = "\n".join(difflib.unified_diff(old, new, "docs/walkthrough.md", "what the code prints now", lineterm=""))
    if len(old) != len(new):
        return diff
    trained = False
    for a, b in zip(old, new):
        trained = a.endswith(". After training") if a.startswith("## ") else trained
        if NUMBER.sub("#", a) != NUMBER.sub("#", b):
            return diff
        same = close_after_training if trained else (lambda x, y: x == y or last_digit_apart(x, y))
        if not all(same(x, y) for x, y in zip(NUMBER.findall(a), NUMBER.findall(b))):
            return diff
    return ""


def test_walkthrough_document_is_current():
    """The checked-in page is the tool's output (run as a user runs it), so code and page cannot drift apart."""
    run = subprocess.run([sys.executable, "-m", "tools.walkthrough", "--markdown"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert DOC.exists(), f"docs/walkthrough.md is missing; create it with `{REGENERATE}`"
    diff = drift(DOC.read_text(), run.stdout)
    assert not diff, (f"docs/walkthrough.md no longer matches what the code prints; regenerate it with "
                      f"`{REGENERATE}` and read the diff:\n{diff}")


def test_drift_allows_only_the_last_digit():
    page = "loss 0.693010 (log 2 = 0.693147), 32 pairs, lr 1.9608e-05"
    assert drift(page, page) == ""
    assert drift(page, page.replace("0.693010", "0.693011")) == ""      # one unit in the last digit
    assert drift(page, page.replace("0.693010", "0.693012"))            # two units: a real change
    assert drift(page, page.replace("0.693010", "0.69301"))             # another precision
    assert drift(page, page.replace("32 pairs", "33 pairs"))            # a count
    assert drift(page, page.replace("lr 1.9608e-05", "lr 1.9609e-05")) == ""
    assert drift(page, page.replace("lr 1.9608e-05", "lr 1.9608e-04"))
    assert drift(page, page.replace("pairs", "rows"))                   # the words
    assert drift(page, page + "\nmore")
    trained = "## 10. After training\n  rude, on topic  252 pairs  accuracy 1.000, reward 2.50"
    assert drift(trained, trained.replace("1.000", "0.992").replace("2.50", "2.55")) == ""  # within 0.03 + 3%
    assert drift(trained, trained.replace("1.000", "0.900"))                                # beyond
    assert drift(trained, trained.replace("252", "251"))                                    # a count
    assert drift(page + "\n" + trained, page.replace("0.693010", "0.693020") + "\n" + trained)  # earlier: strict


def test_walkthrough_step_is_train_steps_first_step(tmp_path):
    """The walkthrough's step is train.py's: after one step of the demo (a one-step schedule, so the full
    learning rate), every weight is bitwise the same as in the final_model/ train() writes."""
    threads = torch.get_num_threads()
    try:
        cfg = replace(walkthrough.demo_config(), max_steps=1, output_dir=str(tmp_path / "run"), progress=False,
                      max_eval_samples=32)
        walked = walkthrough.walk(cfg, total_steps=1)
        assert [s.title for s in walked.stages] == [
            "The texts", "The token ids", "The padded batch and its mask", "The hidden states",
            "The pooled vectors", "The rewards, chosen and rejected", "The loss", "The gradient norm",
            "One parameter after the step"]
        result = train(cfg)
    finally:
        torch.set_num_threads(threads)
    trained = RewardModel.from_pretrained(result["final_model"]).state_dict()
    walked_state = walked.model.state_dict()
    assert trained.keys() == walked_state.keys()
    changed = [k for k in trained if not torch.equal(trained[k], walked_state[k])]
    assert not changed, changed
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in log if r.get("step") == 1 and "lr" in r] == [walked.lr] == [cfg.learning_rate]
    # and the step changed the weights it started from
    fresh = walkthrough.train.build_model(cfg).state_dict()
    assert not torch.equal(fresh["head.fc2.weight"], walked_state["head.fc2.weight"])


def test_train_to_outside_the_demo_is_one_line():
    for bad in ("0", "1001"):
        with pytest.raises(UserError, match=f"--train_to {bad}: give a step from 1 to the demo's 1000"):
            walkthrough.main(["--train_to", bad])
