"""``sparselora`` command line: prune, restore (SparseLoRA), merge, sparsify, bench, demo, env.

Every step reads a model directory and writes one (``--out``), so the flow is a chain::

    sparselora prune    --tiny llava --method wanda --out pruned/
    sparselora restore  pruned/ --teacher-tiny llava --steps 200 --out restored/
    sparselora merge    restored/ --out merged/
    sparselora sparsify merged/ --out sparse/
    sparselora bench    sparse/

or, in one command on built-in defaults (real MiniLM weights + a tiny LLaVA), ``sparselora demo``.

Directories: a dense/pruned model is a transformers ``save_pretrained`` folder plus
``sparselora_masks.safetensors`` (exact 2:4 masks, bit-packed) and ``sparselora.json`` (stage,
provenance); a restored one also has ``sparselora_adapters.safetensors``; a sparsified one is, by
default, a transformers ``save_pretrained`` folder whose ``config.json`` carries the ``sparselora``
``quantization_config`` (``from_pretrained`` loads it packed once sparselora is imported, see
:mod:`sparselora.hf_quantizer`), or with ``--format`` a :func:`sparselora.checkpoint.save_sparse`
folder. Every output keeps the input's tokenizer, processor, chat template and generation config files.

Every command writes its ``--out`` through :func:`sparselora.staging.staged_output`: built in a
temporary sibling directory and renamed into place only when the command succeeded, so a failed or
interrupted command leaves an earlier output as it was. Errors: see :func:`main`.

Heavy imports (torch, transformers, pruning, lora) happen inside the commands, so ``--help`` is
instant and a command whose part is missing from the installation says so clearly.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

from .steps import STRATEGIES as _STRATEGIES
from .steps import CLIError, layer_latency, magnitude_24, prune_model
from .steps import have as _have
from .steps import need as _need
from .steps import output_fn as _output_fn
from .steps import pattern_arg as _pattern

MASKS_FILE = "sparselora_masks.safetensors"
ADAPTERS_FILE = "sparselora_adapters.safetensors"
#: restore --method choices, the default first (sparselora.restore.METHODS / DEFAULT_METHOD; a test keeps them equal)
RESTORE_METHODS = ("blocks", "sparselora", "masked")
#: block-wise restoration of a text model on its built-in text: this many sentences unless --calib-batches is given
BLOCKS_TEXT_SENTENCES = 2048
STATE_FILE = "sparselora.json"
# the keys of sparselora.tiny_models.BUILDERS, spelled out so that `--help` does not import torch (a test keeps them equal)
EXTRA_COPY_HELP = ("let auto pick backends that keep a second copy of each weight next to the canonical one "
                   "(cusparselt, hybrid: ~1.125x the dense bytes instead of ~0.56x); off by default")
TINY_FAMILIES = ("blip-2", "clip", "gemma3", "idefics3", "instructblip", "llava", "paligemma", "qwen2-vl", "qwen2.5-vl",
                 "siglip", "smolvlm")


def _int_arg(text: str) -> int:
    # argparse turns the ValueError into "argument --steps: invalid _positive_int value"; say why instead
    import argparse

    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def _nonnegative_int(text: str) -> int:
    import argparse

    v = _int_arg(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"{v} is negative")
    return v


def _positive_int(text: str) -> int:
    import argparse

    v = _int_arg(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {v}")
    return v


def _positive_float(text: str) -> float:
    import argparse
    import math

    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return v




def _strategy(text: str):
    """'language' / 'vision' / 'both', or a JSON object {part: ratio-or-pattern} (checked in full by the command)."""
    import argparse

    if text.lstrip().startswith("{"):
        try:
            v = json.loads(text)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"{text!r} is not valid JSON ({e})") from None
        if not isinstance(v, dict):
            raise argparse.ArgumentTypeError(f"{text!r} must be a JSON object such as '{{\"vision\": 0.3, \"language\": \"2:4\"}}'")
        return v
    if text not in _STRATEGIES:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(_STRATEGIES)}, or a JSON object "
                                         "{part: ratio-or-pattern} with parts vision, projector, language, head")
    return text


def _device(text: str) -> str:
    import argparse
    import re

    if not re.fullmatch(r"cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device this command runs on: use cpu, cuda or cuda:N")
    return text


# ---------------------------------------------------------------------------------------
# model directories
def _read_state(path: Path) -> dict:
    f = path / STATE_FILE
    if not f.exists():
        return {}
    try:
        state = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CLIError(f"{f}: cannot read it ({e})") from None
    if not isinstance(state, dict):
        raise CLIError(f"{f}: corrupt (not a JSON object)")
    return state


def _write_state(path: Path, state: dict) -> None:
    from .checkpoint import _atomic_write_text

    _atomic_write_text(path / STATE_FILE, json.dumps(state, indent=1, sort_keys=True) + "\n")


def _model_class(config):
    import transformers

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    return transformers.AutoModel


def _model_dir(arg: str, what: str) -> Path:
    path = Path(arg)
    if not path.exists():
        raise CLIError(f"{what} {path} does not exist")
    if not path.is_dir():
        raise CLIError(f"{what} {path} is not a model directory")
    return path


def load_model(args_model: str | None, tiny: str | None, dtype: str | None = None, backend: str = "auto", what: str = "model",
               allow_extra_copy: bool = False):
    """(model, info) from ``--tiny FAMILY`` or a model directory (dense, pruned or sparsified).

    A directory whose files claim a sparse format this package reads (:func:`checkpoint.sparse_claim`)
    is loaded by :func:`checkpoint.load_sparse` or not at all: its CheckpointError propagates, since
    ``from_pretrained`` would initialise every packed layer at random."""
    import torch

    tdtype = getattr(torch, dtype) if dtype else None
    if tiny:
        from .tiny_models import build

        from .families import get_family

        model = build(tiny, dtype=tdtype or torch.float32)
        # a tiny model's name (e.g. "smolvlm") is not always its family's name ("idefics3")
        return model, {"tiny": tiny, "family": get_family(model).name, "stage": "dense"}
    if not args_model:
        raise CLIError("give a model directory or --tiny FAMILY")
    path = _model_dir(args_model, what)
    state = _read_state(path)
    from transformers import AutoConfig

    from .checkpoint import load_sparse, read_metadata, sparse_claim

    claim = sparse_claim(path)  # before AutoConfig: a sparse config must not be read as a plain one
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:
        raise CLIError(f"{path}: cannot read config.json ({_one_line(e)})") from None
    cls = _model_class(config)
    from .hf_quantizer import is_packed_dir

    if is_packed_dir(path):  # transformers-native packed directory: from_pretrained streams the packed tensors in
        kw = {"dtype": tdtype} if tdtype else {"dtype": "auto"}
        model = _from_pretrained(cls, path, kw)
        if backend != "auto" or allow_extra_copy:
            from .patch import sparse_layers

            for m in sparse_layers(model).values():
                m.set_backend(backend, allow_extra_copy=allow_extra_copy)
        return model, dict(state, stage=state.get("stage", "sparsified"))
    if claim is not None:
        meta = read_metadata(path)  # CheckpointError (naming the file) goes to the user, never to from_pretrained
        # a compressed checkpoint: build the architecture from the config, then load packed
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        dtypes = {v["dtype"] for v in meta["sparse_layers"].values()}
        want = tdtype or (getattr(torch, dtypes.pop()) if len(dtypes) == 1 else torch.float32)
        from accelerate import init_empty_weights

        with init_empty_weights():  # no weights: load_sparse puts the checkpoint's in place (nothing dense, no random init)
            model = cls._from_config(config, dtype=want) if hasattr(cls, "_from_config") else cls(config)
        model = model.to(want).eval()
        load_sparse(model, path, backend=backend, allow_extra_copy=allow_extra_copy)
        return model, dict(state, stage=state.get("stage", "sparsified"))
    model = _from_pretrained(cls, path, {"dtype": tdtype} if tdtype else {})
    _load_masks(model, path / MASKS_FILE)
    return model, state


def _from_pretrained(cls, path: Path, kw: dict):
    from .checkpoint import CheckpointError
    from .format import SparsityError

    try:
        return cls.from_pretrained(path, **kw).eval()
    except (SparsityError, CheckpointError):
        raise  # the package's own checks: their messages name the file/layer
    except (OSError, ValueError, RuntimeError) as e:  # missing/corrupt weights, shape mismatches: about the files
        raise CLIError(f"{path}: cannot load the model ({type(e).__name__}: {_one_line(e)})") from None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def _load_masks(model, masks: Path) -> None:
    if not masks.exists():
        return
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .checkpoint import CheckpointError, _unpackbits

    try:
        stored = load_file(masks)
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{masks}: cannot read ({_one_line(e)}); the file is truncated or corrupt") from None
    for name, bits in stored.items():
        try:
            lin = model.get_submodule(name)
        except AttributeError:
            lin = None
        if not isinstance(lin, torch.nn.Linear):
            raise CheckpointError(f"{masks}: mask of '{name}', which is not a Linear layer of {type(model).__name__}")
        if bits.dtype != torch.uint8 or bits.dim() != 2 or bits.shape[1] != -(-lin.in_features // 8):
            raise CheckpointError(f"{masks}: mask of '{name}' is {bits.dtype} {tuple(bits.shape)}, expected bit-packed uint8 "
                                  f"{(lin.out_features, -(-lin.in_features // 8))}")
        mask = _unpackbits(bits, lin.in_features).to(lin.weight.device)
        if mask.shape != lin.weight.shape:
            raise CheckpointError(f"{masks}: mask of '{name}' is {tuple(mask.shape)}, layer is {tuple(lin.weight.shape)}")
        lin.register_buffer("sparse_mask", mask, persistent=False)


def save_model(model, out: Path, state: dict, tokenizer_from: Path | None = None) -> None:
    """save_pretrained + exact masks of the pruned layers + stage info (into a staged directory)."""
    import torch
    from safetensors.torch import save_file

    from .checkpoint import _atomic_write, _packbits

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    masks = {n: _packbits(m.sparse_mask.cpu()) for n, m in model.named_modules()
             if isinstance(getattr(m, "sparse_mask", None), torch.Tensor) and isinstance(m, torch.nn.Linear)}
    if masks:
        _atomic_write(out / MASKS_FILE, lambda tmp: save_file(masks, tmp))
    _copy_tokenizer(tokenizer_from, out)
    _write_state(out, state)


# what AutoTokenizer / AutoProcessor / generate() read besides the weights and config.json
_MODEL_FILES = ("vocab.txt", "special_tokens_map.json", "merges.txt", "vocab.json", "added_tokens.json", "spiece.model",
                "preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json", "chat_template.json",
                "chat_template.jinja", "generation_config.json")


def _copy_tokenizer(src: Path | None, out: Path) -> None:
    """Copy the tokenizer, processor, chat template and generation config files of the input
    directory (those the output lacks), so that every stage's output is a complete model directory."""
    import shutil

    if src is None or not Path(src).is_dir():
        return
    for f in Path(src).iterdir():
        if f.is_file() and (f.name.startswith("tokenizer") or f.name in _MODEL_FILES) and not (out / f.name).exists():
            shutil.copy2(f, out / f.name)
    templates = Path(src) / "additional_chat_templates"
    if templates.is_dir() and not (out / templates.name).exists():
        shutil.copytree(templates, out / templates.name)


# ---------------------------------------------------------------------------------------
# calibration / training inputs
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model")


def _text_model_dir(dirs) -> str | None:
    """The first of ``dirs`` with a tokenizer (a text model directory has no image processor)."""
    return next((d for d in dirs if d and any((Path(d) / f).is_file() for f in _TOKENIZER_FILES)), None)


def check_calib(args, model_dirs: list, tiny: str | None, text: tuple[int, int] | None = None):
    """The --calib data (or the offline default), read and checked before any model is loaded:
    a CalibData to render with the processor of the first of ``model_dirs`` that has one, or None
    (tiny models: random inputs from the config; text models: text that ships with Python). A text
    model (a tokenizer, no processor) takes text-only --calib data (a .txt file, one sample per
    line, or JSONL without images): ``text[0]`` samples by default where the caller asks for the
    built-in text's count (block-wise restore), else --calib-batches x --batch."""
    from .calib_data import CalibDataError, has_processor, load_calib

    if tiny:
        if args.calib or args.calib_prompts:
            raise CLIError(f"--calib: the built-in tiny {tiny} model has no processor to render images and prompts with; "
                           "it calibrates on random inputs built from its config (drop --calib, or save a model with a processor)")
        return None
    if not any(has_processor(d) for d in model_dirs if d):
        shown = " / ".join(str(d) for d in model_dirs if d)
        text_model = _text_model_dir(model_dirs) is not None
        if args.calib_prompts and text_model:
            raise CLIError(f"--calib-prompts: {shown} is a text model (a tokenizer, no image processor); prompts go with "
                           "images for a VLM: give a text model --calib FILE.txt, one sample per line")
        if args.calib and text_model:
            try:
                data = load_calib(args.calib, None, n=args.calib_samples or (text[0] if text else args.calib_batches * args.batch))
            except CalibDataError as e:
                raise CLIError(str(e)) from None
            if data.has_images:
                raise CLIError(f"--calib {args.calib}: {shown} is a text model (a tokenizer, no image processor): give it text "
                               "only, a .txt file with one sample per line or JSONL lines without \"image\"")
            return data
        if args.calib or args.calib_prompts:
            raise CLIError(f"--calib: {shown} has no processor (processor_config.json or preprocessor_config.json) to render "
                           "images and prompts with, and no tokenizer to take text-only data with; copy the original model's "
                           "processor or tokenizer files into it")
        return None
    try:
        return load_calib(args.calib, args.calib_prompts, n=args.calib_samples or args.calib_batches * args.batch)
    except CalibDataError as e:
        raise CLIError(str(e)) from None


def calibration_batches(model, info: dict, model_dir: str | None, n: int, batch: int, max_length: int = 48, data=None,
                        processor_dirs: tuple = (), max_text_tokens: int | None = None,
                        text: tuple[int, int] | None = None) -> list[dict]:
    """Forward-kwargs batches: ``data`` (from :func:`check_calib`) rendered with the processor of the
    first of ``processor_dirs`` that has one; random inputs for a tiny model; for a text model,
    ``n`` batches of ``batch`` sentences of the built-in mixed text, or ``text=(sentences, batch)``."""
    from .calib_data import (CalibDataError, has_processor, load_processor, render, text_batches,
                             tiny_batches)

    if info.get("tiny"):
        return tiny_batches(info["tiny"], model, n, batch)
    if data is not None and not any(has_processor(d) for d in processor_dirs if d):  # a text model's own text
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(_text_model_dir(processor_dirs))
        return text_batches(tok, [s.text for s in data.samples], text[1] if text else batch, max_text_tokens or max_length,
                            by_length=True)
    if data is not None:
        src = next(d for d in processor_dirs if has_processor(d))
        try:
            return render(data, load_processor(src), batch=batch, max_text_tokens=max_text_tokens)
        except CalibDataError as e:
            raise CLIError(str(e)) from None
    if model_dir:
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(model_dir)
        except Exception:
            tok = None
        if tok is not None and getattr(model.config, "model_type", "") in ("bert", "roberta", "distilbert", "xlm-roberta", "mpnet", "llama", "gemma", "qwen2", "opt", "mistral"):
            from .text_sources import calibration_texts  # several text sources mixed (see sparselora.restore)

            # length-bucketed: padding is compute (about 45 % of random batches of mixed text)
            sentences, batch = text or (n * batch, batch)
            return text_batches(tok, calibration_texts(sentences), batch, max_length, by_length=True)
    raise CLIError(f"this command needs calibration inputs and {model_dir} has no processor (processor_config.json or "
                   "preprocessor_config.json) to make them with: copy the original model's processor files into it, or call "
                   "the Python API with your own batches")


# ---------------------------------------------------------------------------------------
# pruning (the pruning package when installed, else magnitude 2:4 via nm_mask)
def _family_for(model, family: str | None):
    from .families import FAMILIES, custom_family, get_family

    if family is not None and family not in FAMILIES:
        raise CLIError(f"--family {family!r} is not a known family; known: {', '.join(sorted(FAMILIES))}")
    try:
        return get_family(model, family)
    except (ValueError, KeyError) as e:
        if getattr(getattr(model, "config", None), "model_type", None) == "bert":
            return custom_family(language=["encoder"], name="bert")  # text encoder: every encoder Linear
        raise CLIError(f"{_one_line(e)}; give --family (known: {', '.join(sorted(FAMILIES))})") from None


def _check_prune_options(pattern: str, strategy) -> None:
    """--pattern and --strategy, checked before any model is loaded."""
    if not _have("sparselora.pruning"):
        if pattern != "2:4" or not isinstance(strategy, str):
            raise CLIError(f"--pattern {pattern} / --strategy {strategy!r} need sparselora.pruning (the built-in fallback "
                           f"does 2:4 magnitude on {', '.join(_STRATEGIES)} only)")
        return
    from .pruning.methods import parse_pattern
    from .pruning.strategy import part_patterns

    try:
        parse_pattern(_pattern(pattern))
    except (ValueError, TypeError) as e:
        raise CLIError(f"--pattern {pattern!r}: {_one_line(e)}") from None
    try:
        part_patterns(strategy, _pattern(pattern))
    except (ValueError, TypeError) as e:
        shown = json.dumps(strategy) if isinstance(strategy, dict) else strategy
        raise CLIError(f"--strategy {shown}: {_one_line(e)}") from None


def _check_skip(model, skip) -> None:
    """Every --skip name must match a Linear layer (exact, prefix or .suffix, as the library matches):
    a typo would otherwise prune or pack the layer it meant to keep."""
    import torch

    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    for s in skip or ():
        if not any(n == s or n.startswith(s + ".") or n.endswith("." + s) for n in names):
            raise CLIError(f"--skip {s!r} matches no Linear layer of {type(model).__name__} (give a module name, a prefix "
                           f"or a .suffix, e.g. {names[0] if names else 'lm_head'!r})")


def _check_backend(name: str) -> None:
    """--backend: a registered name that can run here, or auto (before any model is loaded)."""
    if name == "auto":
        return
    from .backends import list_backends

    backends = {b.name: b for b in list_backends()}
    usable = ["auto"] + [n for n, b in backends.items() if b.unavailable_reason() is None]
    if name not in backends:
        raise CLIError(f"--backend {name!r} is not a backend; choose from auto, {', '.join(sorted(backends))} "
                       f"(usable here: {', '.join(usable)})")
    why = backends[name].unavailable_reason()
    if why:
        raise CLIError(f"--backend {name!r} cannot run here ({why}); usable here: {', '.join(usable)}")


def _check_device(device: str | None):
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            raise CLIError(f"--device {device}: {why}; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CLIError(f"--device {device}: there are {torch.cuda.device_count()} CUDA devices (cuda:0..cuda:{torch.cuda.device_count() - 1})")
    return dev


# ---------------------------------------------------------------------------------------
# commands: each writes its --out through staging.staged_output (a temporary sibling directory,
# renamed into place only when the command succeeded: a failed or interrupted stage leaves the
# previous output as it was)
def _staged(out: str):
    from .staging import staged_output

    return staged_output(out, "--out")


def cmd_env(args) -> int:
    from .env import report

    print(report())
    return 0


def cmd_prune(args) -> int:
    _check_prune_options(args.pattern, args.strategy)
    if args.refit_iters and args.method != "sparsegpt":
        raise CLIError(f"--refit-iters: only --method sparsegpt refits kept weights (got --method {args.method})")
    calib_device = _check_device(args.device) if args.device else None  # before the model loads
    if args.family:
        from .families import FAMILIES

        if args.family not in FAMILIES:
            raise CLIError(f"--family {args.family!r} is not a known family; known: {', '.join(sorted(FAMILIES))}")
    data = None
    if args.method == "magnitude":
        if args.calib or args.calib_prompts:
            raise CLIError("--calib: --method magnitude uses no calibration data (wanda and sparsegpt do)")
    else:  # the data is checked before the model loads (minutes at 7B)
        tiny = args.tiny or (_read_state(_model_dir(args.model, "model")).get("tiny") if args.model else None)
        data = check_calib(args, [args.model], tiny)
    with _staged(args.out) as tmp:
        model, info = load_model(args.model, args.tiny, args.dtype)
        fam = _family_for(model, info.get("family") if info.get("tiny") else args.family)
        _check_skip(model, args.skip)
        calib = None
        if args.method != "magnitude":
            calib = calibration_batches(model, info, args.model, args.calib_batches, args.batch, data=data,
                                        processor_dirs=(args.model,), max_text_tokens=args.calib_seq_len)
        t = time.time()
        rows, used, md = prune_model(model, args.method, args.pattern, args.strategy, fam, calib, progress=not args.quiet,
                                     device=calib_device if args.method != "magnitude" else None,
                                     skip=args.skip, refit_iters=args.refit_iters)
        state = dict(info, stage="pruned", method=used, pattern=args.pattern, strategy=args.strategy,
                     source=args.model or f"tiny:{args.tiny}")
        if data is not None:
            state["calib"] = data.source
        if args.skip:
            state["skip"] = list(args.skip)
        save_model(model, tmp, state, tokenizer_from=Path(args.model) if args.model else None)
        if md:
            (tmp / "prune_report.md").write_text(md + "\n")
    print(f"pruned {len(rows)} layers ({used}, {args.pattern}, strategy {json.dumps(args.strategy) if isinstance(args.strategy, dict) else args.strategy}) "
          f"in {time.time() - t:.1f}s -> {args.out}")
    return 0


def _lora():
    return _need("sparselora.lora", "SparseLoRA"), _need("sparselora.distill", "SparseLoRA distillation")


def _offloaded_teacher(args, stack):
    """The dense teacher with every weight in an accelerate disk-offload folder (``--teacher-offload``):
    its parameters stay on meta and each module's weights are read back only for its own forward, so
    the teacher is never resident next to the student (only while it loads, before the student does).
    Without a folder a temporary one is used and removed at the end."""
    import tempfile

    from accelerate import disk_offload

    folder = Path(args.teacher_offload) if args.teacher_offload else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sparselora-teacher-")))
    if folder.exists() and any(folder.iterdir()):
        raise CLIError(f"--teacher-offload {folder}: not empty; give a new or empty folder (its files would be overwritten)")
    teacher, _ = load_model(args.teacher, args.teacher_tiny, args.dtype, what="--teacher")
    disk_offload(teacher, str(folder), execution_device="cpu")
    return teacher


def cmd_restore(args) -> int:
    import torch

    if not args.model:
        raise CLIError("give the pruned model directory (the output of 'sparselora prune')")
    if bool(args.teacher) == bool(args.teacher_tiny):
        raise CLIError("give the dense teacher: exactly one of --teacher DIR or --teacher-tiny FAMILY")
    method = args.method
    if method != "sparselora" and (args.rank is not None or args.alpha is not None):
        raise CLIError(f"--rank and --alpha set the SparseLoRA adapters: they do not apply to --method {method}")
    if method == "blocks" and args.loss is not None:
        raise CLIError("--loss does not apply to --method blocks (each block matches its dense block's output)")
    in_place = method != "sparselora"  # the kept weights train themselves: the result is already merged
    if in_place and args.merge:
        raise CLIError(f"--merge: --method {method} writes a merged model already (nothing to merge)")
    rank, alpha, loss = args.rank or 16, args.alpha or 32.0, args.loss or "mse"
    # block-wise fits each block to what it is shown: on the built-in text (a sentence is ~26 tokens)
    # it needs thousands of sentences, not the 128 the end-to-end methods use (MiniLM: 128 sentences
    # -0.042 held-out cosine against 2048, README); images bring hundreds of tokens per sample
    text = (BLOCKS_TEXT_SENTENCES, args.batch or 16) if method == "blocks" and args.calib_batches is None else None
    args.batch = args.batch or 8
    args.calib_batches = args.calib_batches or 16
    lora, _ = _lora()
    tiny = args.teacher_tiny or _read_state(_model_dir(args.model, "model")).get("tiny")
    if args.teacher:
        _model_dir(args.teacher, "--teacher")
    data = check_calib(args, [args.model, args.teacher], tiny, text)  # before either model loads
    with _staged(args.out) as tmp, contextlib.ExitStack() as stack:
        teacher = None
        if args.teacher_offload is not None:  # teacher first, so it is on disk before the student loads
            teacher = _offloaded_teacher(args, stack)
        student, info = load_model(args.model, None, args.dtype)
        if teacher is None:
            teacher, _ = load_model(args.teacher, args.teacher_tiny, args.dtype, what="--teacher")
        teacher.eval()
        if not any(isinstance(getattr(m, "sparse_mask", None), torch.Tensor) for m in student.modules()):
            raise CLIError(f"{args.model} has no pruned layers (no {MASKS_FILE}); run 'sparselora prune' first")
        batches = calibration_batches(teacher, dict(info, tiny=args.teacher_tiny or info.get("tiny")), args.teacher or args.model,
                                      args.calib_batches, args.batch, data=data, processor_dirs=(args.model, args.teacher),
                                      max_text_tokens=args.calib_seq_len, text=text)
        state = dict(info, stage="restored")
        if data is not None:  # what restoration trained on (the pruning's own data stays under "calib")
            state["restore_calib"] = data.source
        restore_mod = _need("sparselora.restore", "restoration")
        lr = args.lr or restore_mod.DEFAULT_LR[method]
        steps = args.steps or restore_mod.DEFAULT_STEPS[method]
        kw = {} if method == "blocks" else dict(loss=loss, output_fn=_output_fn)
        if not in_place:
            if not args.merge:
                save_model(student, tmp, state, tokenizer_from=Path(args.model))  # the frozen pruned base, before adapters
            names = lora.add_sparse_lora(student, r=rank, alpha=alpha)
            print(f"distilling {steps} steps into {len(names)} SparseLoRA layers ...", file=sys.stderr, flush=True)
        try:
            stats = restore_mod.restore(student, teacher, batches, steps=steps, lr=lr, progress=not args.quiet, method=method, **kw)
        except FloatingPointError as e:
            raise CLIError(f"{e}; try a smaller --lr (now {lr})") from None
        except ValueError as e:
            if not in_place:
                raise
            raise CLIError(str(e)) from None  # the student cannot train in place (dtype, adapters, off-mask weights): names the layer
        if in_place:
            record = {"method": method, "steps": steps, "lr": lr}
            if method == "blocks":
                record.update(steps_per="block", rare_tokens=stats["rare_tokens"], block_error_before=stats["block_error_before"],
                              block_error_after=stats["block_error_after"])
            else:
                record["loss"] = loss
            save_model(student, tmp, dict(state, stage="merged", restore=record), tokenizer_from=Path(args.model))
            per = " per block" if method == "blocks" else ""
            print(f"restored {len(stats['names'])} pruned layers in place ({method}, {steps} steps{per}): {_short(stats)} -> {args.out}")
            return 0
        state["lora"] = {"r": rank, "alpha": alpha, "names": list(names), "steps": steps, "loss": loss}
        if args.merge:
            lora.merge_sparse_lora(student)
            save_model(student, tmp, dict(state, stage="merged"), tokenizer_from=Path(args.model))
        else:
            from safetensors.torch import save_file

            from .checkpoint import _atomic_write

            trained = {id(p) for p in lora.lora_parameters(student)}
            adapters = {n: p.detach().cpu().contiguous() for n, p in student.named_parameters() if id(p) in trained}
            if not adapters:
                raise CLIError("add_sparse_lora attached no trainable adapters")
            _atomic_write(tmp / ADAPTERS_FILE, lambda f: save_file(adapters, f))
            _write_state(tmp, state)
    print(f"restored with SparseLoRA r={rank} for {steps} steps: {_short(stats)} -> {args.out}")
    return 0


def _short(stats) -> str:
    if isinstance(stats, dict):
        return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in stats.items() if not isinstance(v, (list, dict)))
    return str(stats)


def _lora_state(path: Path, state: dict) -> dict:
    cfg = state.get("lora")
    if not isinstance(cfg, dict) or not all(k in cfg for k in ("r", "alpha", "names")):
        raise CLIError(f"{path / STATE_FILE}: no complete 'lora' entry (r, alpha, names): not a finished 'sparselora restore' output")
    return cfg


def cmd_merge(args) -> int:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .checkpoint import CheckpointError

    if not args.model:
        raise CLIError("give the directory written by 'sparselora restore'")
    path = _model_dir(args.model, "model")
    state = _read_state(path)
    if state.get("stage") == "merged":
        raise CLIError(f"{path} is already merged")
    if state.get("stage") != "restored" or not (path / ADAPTERS_FILE).exists():
        raise CLIError(f"{path} is not a 'sparselora restore' output (stage {state.get('stage')!r}, no {ADAPTERS_FILE})")
    cfg = _lora_state(path, state)
    lora, _ = _lora()
    with _staged(args.out) as tmp:
        model, info = load_model(args.model, None, args.dtype)
        lora.add_sparse_lora(model, r=cfg["r"], alpha=cfg["alpha"], names=cfg["names"])
        try:
            adapters = load_file(path / ADAPTERS_FILE)
        except (OSError, SafetensorError) as e:
            raise CheckpointError(f"{path / ADAPTERS_FILE}: cannot read ({_one_line(e)}); the file is truncated or corrupt") from None
        try:
            result = model.load_state_dict(adapters, strict=False)
        except RuntimeError as e:
            raise CheckpointError(f"{path / ADAPTERS_FILE}: adapters do not fit the model ({_one_line(e)[:300]})") from None
        if result.unexpected_keys:
            raise CheckpointError(f"{path / ADAPTERS_FILE}: adapters do not fit the model: {result.unexpected_keys[:5]}")
        lora.merge_sparse_lora(model)
        save_model(model, tmp, dict(info, stage="merged"), tokenizer_from=path)
    print(f"merged {len(cfg['names'])} SparseLoRA layers -> {args.out}")
    return 0


def cmd_sparsify(args) -> int:
    from .checkpoint import save_sparse
    from .patch import sparsify

    _check_backend(args.backend)
    with _staged(args.out) as out:
        model, info = load_model(args.model, args.tiny, args.dtype)
        _check_skip(model, args.skip)
        if args.tiny:  # a built-in model is dense: prune it by magnitude first so there is something to pack
            magnitude_24(model, args.strategy, _family_for(model, None))
        report = sparsify(model, backend=args.backend, skip=args.skip or (), tokens=args.tokens or None,
                          allow_extra_copy=args.allow_extra_copy)
        if not report.sparse:
            why = [r.reason for r in report.rows if r.reason]
            raise CLIError(f"no layer was sparsified ({len(why)} left dense, e.g. {why[0]})" if why else
                           "no pruned layers to sparsify (no sparse_mask found); run 'sparselora prune' first")
        if args.format == "transformers":  # config.json quantization_config + packed model.safetensors (hf_quantizer)
            model.save_pretrained(out)
            f = out / "model.safetensors" if (out / "model.safetensors").exists() else out / "model.safetensors.index.json"
        else:
            if args.format == "compressed-tensors":
                from .compressed_tensors_interop import LEGACY_NOTE

                print(f"note: {LEGACY_NOTE}", file=sys.stderr)
            f = save_sparse(model, out, extra_config={"stage": info.get("stage"), "source": args.model or f"tiny:{args.tiny}"},
                            format=args.format)
        _write_state(out, dict(info, stage="sparsified", format=args.format))
        if args.model:
            _copy_tokenizer(Path(args.model), out)
        (out / "sparsify_report.md").write_text(report.to_markdown() + "\n")
        size = f.stat().st_size
    print(report.to_markdown() if args.verbose else report.summary())
    print(f"wrote {Path(args.out) / f.name} ({size / 2**20:.2f} MiB)")
    return 0


def model_memory(model) -> dict:
    """Every resident byte of the sparse layers (backend buffers included) against their dense
    parameters, and of the whole model. Layers moved since their backend was chosen choose it
    again first, so the count is what they hold when they run."""
    from .memory import dense_linear_bytes, resident_bytes, workspace_bytes
    from .patch import sparse_layers

    layers = sparse_layers(model)
    for m in layers.values():
        m.ensure_backend()
    dense = sum(dense_linear_bytes(m.out_features, m.in_features, m.weight_dtype, m.bias is not None) for m in layers.values())
    now = sum(m.resident_bytes() for m in layers.values())
    two = sum(m.weight_copies > 1 for m in layers.values())
    out = {"sparse_layers": len(layers), "sparse_layers_dense_bytes": dense, "sparse_layers_resident_bytes": now,
           "ratio": now / dense if dense else float("nan"), "layers_with_2_copies": two, "model_resident_bytes": resident_bytes(model),
           "backend_workspace_bytes": workspace_bytes(model)}
    ws = out["backend_workspace_bytes"]
    out["line"] = (f"memory: {len(layers)} sparse layers hold {now / 2**20:.2f} MiB (every buffer, backend buffers included) vs "
                   f"{dense / 2**20:.2f} MiB dense ({out['ratio']:.3f}x)"
                   + (f"; {two} of them hold 2 copies of their weight" if two else "")
                   + f"; whole model {out['model_resident_bytes'] / 2**20:.2f} MiB resident"
                   + (f" plus {ws / 2**20:.2f} MiB of backend workspace (per device, not a weight copy)" if ws else ""))
    return out


def _check_json_out(arg: str | None) -> None:
    if arg is None:
        return
    p = Path(arg)
    if p.is_dir():
        raise CLIError(f"--json {arg} is a directory; give a file name")
    if not p.parent.is_dir():
        raise CLIError(f"--json {arg}: directory {p.parent} does not exist")
    import os

    if not os.access(p.parent, os.W_OK):
        raise CLIError(f"--json {arg}: cannot write in {p.parent} (permission denied)")


def cmd_bench(args) -> int:
    from .patch import sparse_layers, sparsify

    dev = _check_device(args.device)
    _check_json_out(args.json)
    model, info = load_model(args.model, args.tiny, args.dtype, allow_extra_copy=args.allow_extra_copy)
    if args.tiny:
        magnitude_24(model, "both", _family_for(model, None))
    if not sparse_layers(model):
        sparsify(model, allow_extra_copy=args.allow_extra_copy)
    if not sparse_layers(model):
        raise CLIError("no sparse layers to benchmark: give a pruned or sparsified model directory")
    import torch

    model.to(dev)
    memory = model_memory(model)
    rows = layer_latency(model, args.tokens, args.iters, progress=not args.quiet)
    label = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU (reference backend: decompress + dense matmul; not the GPU kernels)"
    print(f"layer latency on {label}, {args.tokens} tokens, median of {args.iters}")
    print("| layer shape | backend | dense ms | sparse ms | speedup |\n|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['shape']} | {r['backend']} | {r['dense_ms']:.3f} | {r['sparse_ms']:.3f} | {r['speedup']:.2f}x |")
    print(memory["line"])
    if args.json:
        from .checkpoint import _atomic_write_text

        try:
            _atomic_write_text(Path(args.json), json.dumps({"device": label, "rows": rows, "memory": memory}, indent=1))
        except OSError as e:
            raise CLIError(f"--json {args.json}: cannot write ({e.strerror or e})") from None
    if dev.type != "cuda":
        print("for GPU end-to-end numbers run: python benchmarks/bench_e2e.py (needs CUDA)")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    with _staged(args.out) as tmp:
        rc = run_demo(args, out=tmp)
        if rc == 0:
            _write_state(tmp, {"stage": "demo"})  # marks the folder as a sparselora output that a rerun may replace
        else:
            raise CLIError(f"the demo failed (status {rc}); {args.out} left as it was")
    return rc


# ---------------------------------------------------------------------------------------
# argument parsing
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sparselora",
        description="2:4 sparsity for vision-language models: prune, restore with SparseLoRA, merge, "
                    "pack into sparse kernels, benchmark, save and load compressed.",
        epilog="Typical flow: prune -> restore -> merge -> sparsify -> bench. 'sparselora demo' runs it all on built-in "
               "models (real all-MiniLM-L6-v2 weights and a tiny LLaVA) in a few CPU minutes. "
               "'sparselora COMMAND --help' for the options of a command.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    p.add_argument("--debug", action="store_true",
                   help="show the Python traceback of every error (also: SPARSELORA_DEBUG=1)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def model_args(sp, tiny=True):
        sp.add_argument("model", nargs="?", help="model directory (transformers save_pretrained, or a sparselora output)")
        if tiny:
            sp.add_argument("--tiny", choices=TINY_FAMILIES, help="use a built-in tiny random VLM instead of a directory")
        sp.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="load the model in this dtype")
        sp.add_argument("-q", "--quiet", action="store_true", help="no progress bars")

    def calib_args(sp):
        sp.add_argument("--calib", metavar="PATH",
                        help="calibration data for a model directory, rendered with its processor and chat template: an image "
                             "folder (prompts from --calib-prompts or bundled ones), a JSONL file of {\"image\": path, \"text\": "
                             "prompt} lines, or a datasets save_to_disk folder (default: images that ship with installed "
                             "packages, e.g. matplotlib's sample data, with bundled prompts; works offline). A text model "
                             "(tokenizer, no processor) takes a .txt file, one sample per line, or JSONL without images: "
                             "text of the domain it will serve (default: mixed text that ships with installed packages)")
        sp.add_argument("--calib-prompts", metavar="FILE", help="with an image folder: one prompt per line")
        sp.add_argument("--calib-samples", type=_positive_int, metavar="N",
                        help="calibration samples (default: --calib-batches x --batch); images and prompts are cycled")
        sp.add_argument("--calib-seq-len", type=_positive_int, default=256, metavar="TOKENS",
                        help="at most this many text tokens per sample, image tokens on top (default: 256)")

    sp = sub.add_parser("env", help="versions, GPU and which sparse backends load here")
    sp.set_defaults(fn=cmd_env)

    sp = sub.add_parser("prune", help="prune a model's Linear layers (2:4 by default)",
                        description="Prune a model to N:M sparsity and write a pruned model directory (masks kept exactly).")
    model_args(sp)
    sp.add_argument("--method", default="wanda", choices=["wanda", "magnitude", "sparsegpt"], help="pruning criterion (default: wanda)")
    sp.add_argument("--pattern", default="2:4", help="2:4, 4:8 or a ratio such as 0.5 (default: 2:4)")
    sp.add_argument("--strategy", default="language", type=_strategy,
                    help="which parts: language, vision, both, or a JSON object {part: ratio-or-pattern} with parts vision, "
                         "projector, language, head, e.g. '{\"vision\": 0.3, \"language\": \"2:4\"}' (default: language)")
    sp.add_argument("--skip", nargs="+", action="extend", metavar="NAME",
                    help="layers to leave dense: a module name, a prefix or a .suffix (repeatable)")
    sp.add_argument("--family", help="model family for unknown model types (see sparselora.families)")
    sp.add_argument("--calib-batches", type=_positive_int, default=32,
                    help="calibration batches for wanda/sparsegpt (default: 32, i.e. 128 samples at --batch 4, as the SparseGPT "
                         "and Wanda papers calibrate; on all-MiniLM-L6-v2 4x more calibration text raised SparseGPT's held-out "
                         "cosine by 0.008, benchmarks/results/eval_ood_bases.md)")
    sp.add_argument("--refit-iters", type=_nonnegative_int, default=0, metavar="N",
                    help="sparsegpt only: N conjugate-gradient iterations re-solving the kept weights for the final mask, "
                         "N GEMMs of each layer's size (100 on all-MiniLM-L6-v2: held-out cosine 0.847 -> 0.878; default: 0, off)")
    sp.add_argument("--batch", type=_positive_int, default=4, help="calibration batch size (default: 4)")
    calib_args(sp)
    sp.add_argument("--device", type=_device,
                    help="calibrate on this device (cpu, cuda, cuda:N) while the model stays in host memory: one module's "
                         "weights on the device at a time (default: where the model is loaded, the CPU)")
    sp.add_argument("--out", required=True, help="output directory")
    sp.set_defaults(fn=cmd_prune)

    sp = sub.add_parser("restore", help="recover quality from the dense model (block-wise reconstruction, SparseLoRA or masked distillation)",
                        description="Recover what pruning lost, from the dense teacher, without leaving the 2:4 masks: by default "
                                    "each block's kept weights are fitted to the dense block (--method blocks); or SparseLoRA "
                                    "adapters, or the kept weights, distilled end to end.")
    model_args(sp, tiny=False)
    sp.add_argument("--teacher", help="dense teacher model directory")
    sp.add_argument("--teacher-tiny", choices=TINY_FAMILIES, help="teacher is the built-in tiny model the student was pruned from")
    sp.add_argument("--teacher-offload", nargs="?", const="", metavar="DIR",
                    help="keep the teacher's weights on disk (accelerate disk offload into DIR, new or empty; a temporary "
                         "folder, removed afterwards, if DIR is omitted): one teacher module resident at a time")
    sp.add_argument("--steps", type=_positive_int, default=None,
                    help="optimizer steps (default: 512 per block for blocks, 200 for sparselora and masked)")
    sp.add_argument("--method", choices=list(RESTORE_METHODS), default=RESTORE_METHODS[0],
                    help="blocks (default): each block's kept weights fitted in place to the dense block's output, one block "
                         "at a time (any dtype; optimizer state for one block), written merged; sparselora: masked low-rank "
                         "adapters distilled end to end, saved beside the frozen base (merge later; any dtype); masked: the kept "
                         "weights distilled end to end in place, written merged (float32 only; gradients and optimizer state "
                         "add 3x the pruned weights' bytes)")
    sp.add_argument("--lr", type=_positive_float, default=None,
                    help="peak learning rate (default: 1e-3 for blocks, 4e-3 for sparselora, 3e-4 for masked; warm-up, then cosine)")
    sp.add_argument("--rank", type=_positive_int, default=None, help="LoRA rank r (default: 16; sparselora only)")
    sp.add_argument("--alpha", type=_positive_float, default=None, help="LoRA alpha (default: 32; sparselora only)")
    sp.add_argument("--loss", default=None, choices=["kl", "mse", "cosine"],
                    help="distillation loss (default: mse; sparselora and masked only)")
    sp.add_argument("--calib-batches", type=_positive_int, default=None,
                    help=f"training batches cycled over (default: 16; for blocks on a text model's built-in text, "
                         f"{BLOCKS_TEXT_SENTENCES} sentences in batches of --batch or 16: block-wise overfits fewer)")
    calib_args(sp)
    sp.add_argument("--batch", type=_positive_int, default=None, help="training batch size (default: 8; see --calib-batches)")
    sp.add_argument("--merge", action="store_true", help="merge the adapters into the weights right away")
    sp.add_argument("--out", required=True, help="output directory")
    sp.set_defaults(fn=cmd_restore)

    sp = sub.add_parser("merge", help="fold SparseLoRA adapters into the weights (exactly 2:4 afterwards)")
    model_args(sp, tiny=False)
    sp.add_argument("--out", required=True, help="output directory")
    sp.set_defaults(fn=cmd_merge)

    sp = sub.add_parser("sparsify", help="pack pruned layers into sparse kernels and save a compressed checkpoint",
                        description="Swap pruned nn.Linear layers for SparseLinear (backend per layer) and save compressed.")
    model_args(sp)
    sp.add_argument("--backend", default="auto", help="auto or a backend name (see 'sparselora env')")
    sp.add_argument("--format", default="transformers", choices=["transformers", "sparselora", "compressed-tensors"],
                    help="checkpoint layout (default: transformers = save_pretrained, loads with from_pretrained once sparselora "
                         "is imported; sparselora = single-file sparselora-24; compressed-tensors = sparse-24-bitmask, legacy: "
                         "today's compressed-tensors/transformers no longer load it)")
    sp.add_argument("--strategy", default="language", choices=_STRATEGIES,
                    help="with --tiny: parts to prune by magnitude first (default: language)")
    sp.add_argument("--skip", nargs="+", action="extend", metavar="NAME",
                    help="layers to leave dense: a module name, a prefix or a .suffix (repeatable)")
    sp.add_argument("--tokens", nargs="*", type=_positive_int, metavar="M",
                    help="with --backend auto: tokens per call you will run (e.g. 1 8 for decode); on a GPU a layer stays "
                         "dense unless a backend's measured table (or, without one, its documented prior) says it "
                         "beats dense at all of them; the report says which decided")
    sp.add_argument("--allow-extra-copy", action="store_true", help=EXTRA_COPY_HELP)
    sp.add_argument("-v", "--verbose", action="store_true", help="print the per-layer report")
    sp.add_argument("--out", required=True, help="output directory")
    sp.set_defaults(fn=cmd_sparsify)

    sp = sub.add_parser("bench", help="time sparse vs dense layers (CPU here; GPU numbers with benchmarks/bench_e2e.py)")
    model_args(sp)
    sp.add_argument("--tokens", type=_positive_int, default=256, help="tokens per call (default: 256)")
    sp.add_argument("--iters", type=_positive_int, default=10)
    sp.add_argument("--device", type=_device, help="cpu, cuda or cuda:N (default: cuda when present)")
    sp.add_argument("--allow-extra-copy", action="store_true", help=EXTRA_COPY_HELP)
    sp.add_argument("--json", help="also write the rows to this JSON file")
    sp.set_defaults(fn=cmd_bench)

    sp = sub.add_parser("demo", help="the whole flow on built-in models: real MiniLM + tiny LLaVA (a few CPU minutes)",
                        description="Prune (2:4), SparseLoRA-restore, merge, sparsify, verify, save/reload and report on the real "
                                    "all-MiniLM-L6-v2 weights and a tiny LLaVA. Writes results.json, results.md and results.png.")
    sp.add_argument("--out", default="./sparselora-demo", help="output directory (default: ./sparselora-demo)")
    sp.add_argument("--steps", type=_positive_int, default=60, help="SparseLoRA distillation steps for MiniLM (default: 60)")
    sp.add_argument("--method", default="wanda", choices=["wanda", "magnitude", "sparsegpt"], help="pruning criterion (default: wanda)")
    sp.add_argument("--eval-sentences", type=_positive_int, default=64, help="held-out sentences for the quality metric (default: 64)")
    sp.add_argument("--batch", type=_positive_int, default=8, help="training batch size (default: 8)")
    sp.add_argument("--iters", type=_positive_int, default=10, help="timing repetitions (default: 10)")
    sp.add_argument("--threads", type=_positive_int, help="CPU threads (default: the idle cores, i.e. the CPUs "
                                                           "available minus the 1-minute load average, at least 1)")
    sp.add_argument("--skip-llava", action="store_true", help="only the MiniLM part")
    sp.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    sp.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sp.set_defaults(fn=cmd_demo)
    return p


def _version() -> str:
    """The installed distribution's version (what pip reports), else the package's own."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sparselora")
    except PackageNotFoundError:
        from . import __version__

        return __version__


def _show_library_messages() -> None:
    """The library reports through ``logging`` (logger ``sparselora``); the command line shows its
    warnings on stderr as ``sparselora: note: ...`` unless the caller configured logging itself."""
    import logging

    lib = logging.getLogger("sparselora")
    if lib.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("sparselora: note: %(message)s"))
    lib.addHandler(handler)
    lib.setLevel(logging.WARNING)


def _debug(args) -> bool:
    import os

    return bool(getattr(args, "debug", False)) or os.environ.get("SPARSELORA_DEBUG", "") not in ("", "0")


@contextlib.contextmanager
def _quiet_transformers(quiet: bool):
    """-q also silences transformers' own progress bars (weight loading, saving)."""
    if not quiet:
        yield
        return
    import os

    if "transformers" not in sys.modules:  # read at its import; a CLI process ends with the command
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        yield
        return
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def main(argv=None) -> int:
    """Run a command. Errors about the input (options, files, models, checkpoints, the output path) are
    one line on stderr, ``sparselora COMMAND: error: ...``, exit status 2, no traceback; an environment
    failure (OSError: disk full, permission) is one line, status 1; Ctrl-C prints ``interrupted``,
    status 130 (the previous --out, staged, is left as it was). Anything else is a bug: its traceback
    is printed with a request to report it, status 1. ``--debug`` (or ``SPARSELORA_DEBUG=1``) shows the
    traceback of every error."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "fn", None):
        parser.print_help()
        return 2
    _show_library_messages()
    from .staging import OutputError

    expected: tuple = (CLIError, OutputError)
    try:
        with _quiet_transformers(getattr(args, "quiet", False)):
            return args.fn(args) or 0
    except KeyboardInterrupt:
        if _debug(args):
            raise
        print(f"sparselora {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        # bad input found by the library (not 2:4, corrupt checkpoint...): its message names the
        # layer or tensor, a traceback would only hide it
        # (their modules are imported only if a command got that far: no torch import for a usage error)
        for mod, name in (("sparselora.checkpoint", "CheckpointError"), ("sparselora.format", "SparsityError")):
            if mod in sys.modules:
                expected += (getattr(sys.modules[mod], name),)
        if _debug(args):
            raise
        if isinstance(e, expected):
            print(f"sparselora {args.command}: error: {e}", file=sys.stderr)
            return 2
        if isinstance(e, OSError):
            print(f"sparselora {args.command}: error: {e}", file=sys.stderr)
            return 1
        import traceback

        traceback.print_exc()
        print(f"sparselora {args.command}: internal error ({type(e).__name__}); this is a bug, please report it with the "
              "traceback above", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
