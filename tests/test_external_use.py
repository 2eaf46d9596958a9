"""Use from another project (README, "Use it from another project"): the README's GRPO snippet, run from a
directory outside the checkout with the checkout on PYTHONPATH, in a project that has its own data.py,
train.py and eval.py, trains one real TRL GRPOTrainer step on our rewards; and the user's modules stay theirs."""
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT, save_hf_model, tiny_rm


def readme_grpo_snippet() -> str:
    block = next(b for b in re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
                 if "GRPOTrainer" in b)
    return block


def test_readme_grpo_snippet_runs_from_another_project(tmp_path, demo_tok):
    pytest.importorskip("trl")
    import transformers
    save_hf_model(tmp_path / "policy", vocab_size=demo_tok.vocab_size)  # a tiny policy that generates
    transformers.PreTrainedTokenizerFast(tokenizer_object=demo_tok.tok, eos_token=demo_tok.eos_token,
                                         pad_token=demo_tok.pad_token).save_pretrained(tmp_path / "policy")
    tiny_rm(demo_tok, pooling="last").save_pretrained(tmp_path / "rm")
    project = tmp_path / "project"  # the user's project: modules named as ours, with other contents
    project.mkdir()
    for name in ("data", "train", "eval"):
        (project / f"{name}.py").write_text(f"OWNER = 'the user'  # the user's own {name}.py\n")
    snippet = readme_grpo_snippet()
    for old, new in ((r'"out/rm/final_model", device="cuda"', f'{str(tmp_path / "rm")!r}'),
                     ('model="Qwen/Qwen3-0.6B"', f'model={str(tmp_path / "policy")!r}'),
                     ('GRPOConfig(output_dir="out/grpo")',
                      'GRPOConfig(output_dir="out/grpo", max_steps=1, per_device_train_batch_size=4, num_generations=2, '
                      'max_completion_length=8, use_cpu=True, bf16=False, report_to="none", logging_steps=1)')):
        assert old in snippet, old  # the README's snippet is the one run here
        snippet = snippet.replace(old, new)
    script = ("from datasets import Dataset\n"
              "dataset = Dataset.from_dict({'prompt': ['\\n\\nHuman: tell me about cats\\n\\nAssistant:'] * 4})\n"
              + snippet +
              "import json, data, train, eval\n"
              "print(json.dumps({'reward': [h['reward'] for h in trainer.state.log_history if 'reward' in h],\n"
              "                  'owners': [m.OWNER for m in (data, train, eval)]}))\n")
    (project / "grpo.py").write_text(script)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "grpo.py"], cwd=project, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(result["reward"]) == 1 and abs(result["reward"][0]) < 1  # our reward function's mean, logged by TRL
    assert result["owners"] == ["the user"] * 3  # the user's data.py, train.py and eval.py stay theirs
    # and without the checkout on the path, the import is what fails: the test above needed it
    env.pop("PYTHONPATH")
    missing = subprocess.run([sys.executable, "-c", "from rm import RewardModel"], cwd=project, env=env,
                             capture_output=True, text=True, timeout=120)
    assert "No module named 'rm'" in missing.stderr
