"""Command lines generated from a dataclass: each field is one flag, and its help lives with the field.

    @dataclass
    class TrainConfig:
        learning_rate: float = option(5e-6, "peak learning rate")
        optim_8bit: bool = option(False, "bitsandbytes AdamW8bit", flags=["--8bit_optim"])

- option(default, help, **argparse settings): a dataclass field that carries its flag's help (and, where the
  default does not fit, flags/aliases, choices, metavar, nargs, const).
- add_fields(parser, cls): one argument per field, in field order. The type comes from the annotation
  (`int | None` -> int, `list` -> one or more values); a bool is a switch (`--NAME` when it defaults to
  False, `--no_NAME` when it defaults to True, its help then "turn off" + the field's). No flag has a
  default: a flag not given stays out of the parsed arguments, so a named configuration (train.py --config
  NAME) supplies the value, and any flag given overrides it.
- positive_int: an argparse type for counts.
- parse_train_command_line: train.py's flags -> a CommandLine (the TrainConfig to run, and --eval_only);
  eval_only_args: `train.py --eval_only` as eval.py's command line.
- parse_eval_command_line: eval.py's flags (written out with argparse: eval.py has no config dataclass).
"""
import argparse
import copy
import dataclasses
import types
import typing
from typing import NamedTuple

from support import benchmarks, validate
from support import report as report_files
from support.errors import ArgumentParser, UserError


def option(default, help: str, **argparse_settings):
    """A dataclass field with its command-line help; a list default is copied for each instance."""
    metadata = {"help": help, **argparse_settings}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: copy.copy(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def value_type(annotation) -> type:
    """The type a flag's value parses to: `int | None` -> int, `list | None` -> list, `str` -> str."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    return typing.get_origin(annotation) or annotation


def add_fields(parser: argparse.ArgumentParser, cls):
    """One argument per field of the dataclass `cls` that has help (option), with no default (see above)."""
    for f in dataclasses.fields(cls):
        if "help" not in f.metadata:
            continue
        settings = dict(f.metadata)
        kind = value_type(f.type)
        if kind is bool:
            flags = settings.pop("flags", None) or [f"--{f.name}" if not f.default else f"--no_{f.name}"]
            settings.setdefault("action", "store_false" if f.default else "store_true")
            if f.default:  # the help says what the field is on; the --no_ flag turns it off
                settings["help"] = f"turn off {settings['help']}"
        else:
            flags = settings.pop("flags", None) or [f"--{f.name}"]
            if kind is list:
                settings.setdefault("nargs", "+")
            elif kind is not str:
                settings.setdefault("type", kind)
        parser.add_argument(*flags, dest=f.name, default=argparse.SUPPRESS, **settings)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


# ---- train.py's command line -----------------------------------------------------------------------


class CommandLine(NamedTuple):
    config: object          # the train.TrainConfig to run
    eval_only: bool         # --eval_only: evaluate --model_path as eval.py does, no training
    model_path: str | None
    given: set              # the settings the flags or the named config gave (not the dataclass defaults)


def parse_train_command_line(config_class, named_configs: dict, argv=None) -> CommandLine:
    """`python train.py [flags]`: --config NAME starts from named_configs[NAME], and any flag given overrides
    it; one flag per field of config_class (add_fields)."""
    p = ArgumentParser(prog="train.py", description="Train a Qwen3 reward model.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default="custom", choices=sorted(named_configs),
                   help="named configuration to start from")
    add_fields(p, config_class)
    p.add_argument("--eval_only", action="store_true", help="only evaluate --model_path (same report as eval.py)")
    p.add_argument("--model_path", help="checkpoint to evaluate with --eval_only")
    p.add_argument("--debug", action="store_true", help="show tracebacks for user errors too")
    args = vars(p.parse_args(argv))
    name, eval_only, model_path = args.pop("config"), args.pop("eval_only"), args.pop("model_path")
    args.pop("debug")
    cfg = config_class(**{**named_configs[name], **args})
    return CommandLine(cfg, eval_only, model_path, set(args) | set(named_configs[name]))


def eval_only_args(cfg, model_path: str | None, given: set) -> list[str]:
    """train.py --eval_only as eval.py's command line; options not given fall back to what the checkpoint was
    trained with."""
    if not model_path:
        raise UserError("--eval_only needs --model_path CHECKPOINT")
    if cfg.eval_split == "none":
        raise UserError("--eval_only with --eval_split none evaluates nothing; pass a split such as test")
    argv = [model_path, "--batch_size", str(cfg.batch_size * 2)]
    if "eval_split" in given:  # else eval.py's default: the held-out pairs the model was trained with
        argv += ["--split", cfg.eval_split]
    if "eval_dataset" in given or "dataset" in given:
        argv += ["--dataset", *(cfg.eval_dataset or cfg.dataset)]
    if "max_length" in given:
        argv += ["--max_length", str(cfg.max_length)]
    if cfg.max_eval_samples:
        argv += ["--max_samples", str(cfg.max_eval_samples)]
    argv += ["--bf16"] * cfg.bf16 + ["--share_prompt"] * cfg.share_prompt + ["--no_progress"] * (not cfg.progress)
    return argv + ["--chat_template", cfg.chat_template]


# ---- eval.py's command line ------------------------------------------------------------------------


def parse_eval_command_line(argv, default_dataset: list, default_max_length: int):
    """`python eval.py CHECKPOINT [flags]`: its flags (the defaults named are eval.py's), each checked before
    any loading and scoring (validate.check_eval_args)."""
    p = ArgumentParser(prog="eval.py", description="Evaluate a reward model on preference pairs: accuracy with a "
                       "95% CI, reward and margin statistics, length bias. Writes evaluation_report.json.")
    p.add_argument("checkpoint", help="a model directory (out/rm/final_model), a train.py checkpoint or output "
                                      "directory, or a Hub id of a Qwen3ForSequenceClassification reward model")
    p.add_argument("--dataset", nargs="+", default=None, metavar="SOURCE",
                   help="data source(s): demo, a Hub dataset id or a local file/directory (default: the ones "
                        f"the model was trained on, else {default_dataset[0]})")
    p.add_argument("--split", default=None,
                   help="dataset split to evaluate (default: test; for a model trained with a held-out share of "
                        "its training pairs, train.py --eval_fraction, that share)")
    p.add_argument("--max_samples", type=positive_int, default=None, help="evaluate only the first N pairs")
    p.add_argument("--batch_size", type=positive_int, default=16, help="pairs per forward pass (default: 16)")
    p.add_argument("--max_length", type=positive_int, default=None,
                   help=f"tokens per sequence; longer pairs are dropped and counted (default: the training "
                        f"max_length, else {default_max_length}; with --benchmark, score()'s: else "
                        "max_position_embeddings)")
    p.add_argument("--chat_template", default="auto", metavar="auto|none|PATH",
                   help="conversational rows (lists of messages): auto renders them with the model's chat "
                        "template (default), PATH with that .jinja file, none refuses them")
    p.add_argument("--bf16", action="store_true", help="run the forward passes under bfloat16 autocast")
    p.add_argument("--share_prompt", action="store_true",
                   help="compute each pair's prompt once (same rewards, faster; the default for a model "
                        "trained with --share_prompt)")
    p.add_argument("--benchmark", choices=benchmarks.NAMES, default=None,
                   help="score a public benchmark from its published files, given with --dataset (see "
                        "docs/benchmarks.md); writes benchmark_rewards.jsonl next to the report")
    p.add_argument("--show", type=int, default=0, metavar="N",
                   help="with --benchmark: print the first N examples as they are rendered and scored")
    p.add_argument("--save_reward_stats", action="store_true",
                   help="save the mean and std of these rewards (chosen and rejected) in the model's config.json, "
                        "for score(..., normalize=True) and OpenRLHF's --normalize_reward")
    p.add_argument("--unsure_threshold", type=float, default=0.1,
                   help="a pair with |margin| below this counts as 'unsure' (default: 0.1)")
    p.add_argument("--output", default=None,
                   help=f"report file, or a directory (existing, or ending in /) to write {report_files.REPORT_NAME} "
                        f"in (default: CHECKPOINT/{report_files.REPORT_NAME}); an existing file is replaced only if "
                        "it is a report")
    p.add_argument("--plots", default=None, metavar="DIR", help="also write PNG plots here (needs matplotlib)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    p.add_argument("--no_progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show the traceback of user errors")
    return validate.check_eval_args(p.parse_args(argv))
