"""Command lines generated from a dataclass: each field is one flag, and its help lives with the field.

    @dataclass
    class TrainConfig:
        learning_rate: float = option(5e-6, "peak learning rate")
        optim_8bit: bool = option(False, "bitsandbytes AdamW8bit", flags=["--8bit_optim"])

- option(default, help, **argparse settings): a dataclass field that carries its flag's help (and, where the
  default does not fit, flags/aliases, choices, metavar, nargs, const).
- add_fields(parser, cls): one argument per field, in field order. The type comes from the annotation
  (`int | None` -> int, `list` -> one or more values); a bool is a switch (`--NAME` when it defaults to
  False, `--no_NAME` when it defaults to True). No flag has a default: a flag not given stays out of the
  parsed arguments, so a named configuration (train.py --config NAME) supplies the value, and any flag given
  overrides it.
- positive_int: an argparse type for counts.
- parse_train_command_line: train.py's flags -> a CommandLine (the TrainConfig to run, and --eval_only);
  eval_only_args: `train.py --eval_only` as eval.py's command line.
"""
import argparse
import copy
import dataclasses
import types
import typing
from typing import NamedTuple

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


