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

Heavy imports (torch, transformers, pruning, lora) happen inside the commands, so ``--help`` is
instant and a command whose part is missing from the installation says so clearly.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

MASKS_FILE = "sparselora_masks.safetensors"
ADAPTERS_FILE = "sparselora_adapters.safetensors"
STATE_FILE = "sparselora.json"
# the keys of sparselora.tiny_models.BUILDERS, spelled out so that `--help` does not import torch (a test keeps them equal)
TINY_FAMILIES = ("blip-2", "clip", "gemma3", "idefics3", "instructblip", "llava", "paligemma", "qwen2-vl", "qwen2.5-vl",
                 "siglip", "smolvlm")


def _positive_int(text: str) -> int:
    # argparse turns the ValueError into "argument --steps: invalid _positive_int value"; say why instead
    import argparse

    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
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


class CLIError(Exception):
    """A user-facing error: printed without a traceback, exit status 2."""


# ---------------------------------------------------------------------------------------
# optional parts of the project
def _need(module: str, what: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name in (module, module.rsplit(".", 1)[0]) or (e.name or "").startswith("sparselora"):
            raise CLIError(f"'{what}' needs {module}, which is not part of this installation ({e}).") from None
        raise


def _have(module: str) -> bool:
    import importlib

    try:
        importlib.import_module(module)
        return True
    except ModuleNotFoundError as e:
        if e.name and (e.name == module or module.startswith(e.name)):
            return False
        raise


# ---------------------------------------------------------------------------------------
# model directories
def _read_state(path: Path) -> dict:
    f = path / STATE_FILE
    return json.loads(f.read_text()) if f.exists() else {}


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


def load_model(args_model: str | None, tiny: str | None, dtype: str | None = None, backend: str = "auto"):
    """(model, info) from ``--tiny FAMILY`` or a model directory (dense, pruned or sparsified)."""
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
    path = Path(args_model)
    if not path.is_dir():
        raise CLIError(f"{path} is not a model directory")
    state = _read_state(path)
    from transformers import AutoConfig

    from .checkpoint import CheckpointError, load_sparse, read_metadata

    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:
        raise CLIError(f"{path}: cannot read config.json ({e})") from None
    cls = _model_class(config)
    from .hf_quantizer import is_packed_dir

    if is_packed_dir(path):  # transformers-native packed directory: from_pretrained streams the packed tensors in
        kw = {"dtype": tdtype} if tdtype else {"dtype": "auto"}
        model = cls.from_pretrained(path, **kw).eval()
        if backend != "auto":
            from .patch import sparse_layers

            for m in sparse_layers(model).values():
                m.set_backend(backend)
        return model, dict(state, stage=state.get("stage", "sparsified"))
    meta = None
    if (path / "model.safetensors").exists() or (path / "model.safetensors.index.json").exists():
        try:
            meta = read_metadata(path)
        except CheckpointError:
            meta = None  # a plain save_pretrained folder
    if meta is not None:
        # a compressed checkpoint: build the architecture from the config, then load packed
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        dtypes = {v["dtype"] for v in meta["sparse_layers"].values()}
        want = tdtype or (getattr(torch, dtypes.pop()) if len(dtypes) == 1 else torch.float32)
        from accelerate import init_empty_weights

        with init_empty_weights():  # no weights: load_sparse puts the checkpoint's in place (nothing dense, no random init)
            model = cls._from_config(config, dtype=want) if hasattr(cls, "_from_config") else cls(config)
        model = model.to(want).eval()
        try:
            load_sparse(model, path, backend=backend)
        except CheckpointError as e:
            raise CLIError(str(e)) from None
        return model, dict(state, stage=state.get("stage", "sparsified"))
    kw = {"dtype": tdtype} if tdtype else {}
    model = cls.from_pretrained(path, **kw).eval()
    masks = path / MASKS_FILE
    if masks.exists():
        from safetensors.torch import load_file

        from .checkpoint import _unpackbits

        for name, bits in load_file(masks).items():
            lin = model.get_submodule(name)
            mask = _unpackbits(bits, lin.in_features).to(lin.weight.device)
            if mask.shape != lin.weight.shape:
                raise CLIError(f"{masks}: mask of '{name}' is {tuple(mask.shape)}, layer is {tuple(lin.weight.shape)}")
            lin.register_buffer("sparse_mask", mask, persistent=False)
    return model, state


def save_model(model, out: Path, state: dict, tokenizer_from: Path | None = None) -> None:
    """save_pretrained + exact masks of the pruned layers + stage info."""
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
def _docstring_sentences(limit: int = 400) -> list[str]:
    """Real English text shipped with Python: first paragraphs of standard-library docstrings."""
    import importlib
    import inspect

    mods = ["json", "os", "os.path", "shutil", "pathlib", "collections", "itertools", "functools", "textwrap", "re", "random",
            "statistics", "datetime", "heapq", "bisect", "csv", "string", "subprocess", "threading", "argparse", "logging",
            "tempfile", "zipfile", "tarfile", "urllib.parse", "http.client", "email.message", "calendar", "fractions",
            "decimal", "difflib", "pprint", "inspect", "typing", "dataclasses", "contextlib", "abc", "queue", "socket",
            "sqlite3", "gzip", "hashlib", "hmac", "secrets", "uuid", "copy", "pickle", "traceback", "unittest", "doctest"]
    seen, out = set(), []
    for name in mods:
        try:
            mod = importlib.import_module(name)
        except Exception:
            continue
        objs = [mod] + [getattr(mod, a, None) for a in sorted(dir(mod)) if not a.startswith("_")]
        for obj in objs:
            doc = inspect.getdoc(obj) if obj is not None else None
            if not doc:
                continue
            para = " ".join(doc.split("\n\n")[0].split())
            if 40 <= len(para) <= 300 and para not in seen and not para.startswith((">>>", "Return self", "Initialize self")):
                seen.add(para)
                out.append(para)
    return out[:limit]


def split_text(sentences: list[str], n_eval: int) -> tuple[list[str], list[str]]:
    """Deterministic held-out split by a hash of the text (not by position)."""
    import hashlib

    keyed = sorted(sentences, key=lambda s: hashlib.sha1(s.encode()).hexdigest())
    return keyed[n_eval:], keyed[:n_eval]


def _text_batches(tokenizer, sentences: list[str], batch: int, max_length: int) -> list[dict]:
    out = []
    for i in range(0, len(sentences), batch):
        chunk = sentences[i:i + batch]
        if chunk:
            enc = tokenizer(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            out.append(dict(enc))
    return out


def _tiny_batches(family: str, model, n: int, batch: int = 2, seed: int = 100) -> list[dict]:
    from .tiny_models import example_inputs

    return [example_inputs(family, model, batch=batch, seed=seed + i) for i in range(n)]


def calibration_batches(model, info: dict, model_dir: str | None, n: int, batch: int, max_length: int = 48) -> list[dict]:
    if info.get("tiny"):
        return _tiny_batches(info["tiny"], model, n, batch)
    if model_dir:
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(model_dir)
        except Exception:
            tok = None
        if tok is not None and getattr(model.config, "model_type", "") in ("bert", "roberta", "distilbert", "xlm-roberta", "mpnet", "llama", "gemma", "qwen2", "opt", "mistral"):
            text, _ = split_text(_docstring_sentences(), 64)
            return _text_batches(tok, text[: n * batch], batch, max_length)
    raise CLIError("this command needs calibration inputs: the CLI makes them for --tiny models and for text models with a "
                   "tokenizer in their directory; for other VLMs call the Python API with your own batches")


def _output_fn(out):
    for k in ("last_hidden_state", "logits", "logits_per_image"):
        v = getattr(out, k, None)
        if v is not None:
            return v
    return out[0]


# ---------------------------------------------------------------------------------------
# pruning (the pruning package when installed, else magnitude 2:4 via nm_mask)
def _family_for(model, family: str | None):
    from .families import custom_family, get_family

    try:
        return get_family(model, family)
    except (ValueError, KeyError):
        if getattr(getattr(model, "config", None), "model_type", None) == "bert":
            return custom_family(language=["encoder"], name="bert")  # text encoder: every encoder Linear
        raise


def _pattern(p: str):
    """'2:4' / '4:8' stay strings; '0.5' becomes the unstructured ratio 0.5."""
    try:
        return float(p)
    except ValueError:
        return p


def prune_model(model, method: str, pattern: str, strategy: str, family, calib, progress: bool = True):
    """Returns (rows, method actually used, the pruning package's markdown report or None)."""
    pattern = _pattern(pattern) if isinstance(pattern, str) else pattern
    if _have("sparselora.pruning"):
        from .pruning import prune

        rep = prune(model, method=method, pattern=pattern, calib=calib if method != "magnitude" else None,
                    strategy=strategy, family=family, progress=progress)
        return list(getattr(rep, "rows", [])), method, (rep.to_markdown() if hasattr(rep, "to_markdown") else None)
    if method != "magnitude":
        print(f"note: sparselora.pruning is not installed; using magnitude 2:4 instead of {method}", file=sys.stderr)
    if pattern != "2:4":
        raise CLIError(f"pattern {pattern} needs sparselora.pruning (the built-in fallback does 2:4 magnitude only)")
    return magnitude_24(model, strategy, family), "magnitude", None


def magnitude_24(model, strategy: str, family) -> list[dict]:
    import torch

    from .families import linear_layers
    from .format import nm_mask

    parts = {"language": ["language"], "vision": ["vision"], "both": ["vision", "language"]}.get(strategy)
    if parts is None:
        raise CLIError(f"strategy {strategy!r}: the built-in fallback knows language / vision / both")
    rows = []
    for name, lin in linear_layers(model, parts, family=family).items():
        if lin.in_features % 4:
            continue
        mask = nm_mask(lin.weight.detach().abs().float(), name=name)
        with torch.no_grad():
            lin.weight.mul_(mask)
        lin.register_buffer("sparse_mask", mask, persistent=False)
        rows.append({"layer": name, "shape": list(lin.weight.shape), "method": "magnitude", "pattern": "2:4"})
    return rows


# ---------------------------------------------------------------------------------------
# commands
def cmd_env(args) -> int:
    from .env import report

    print(report())
    return 0


def cmd_prune(args) -> int:
    model, info = load_model(args.model, args.tiny, args.dtype)
    fam = _family_for(model, info.get("family") if info.get("tiny") else args.family)
    calib = None
    if args.method != "magnitude":
        calib = calibration_batches(model, info, args.model, args.calib_batches, args.batch)
    t = time.time()
    rows, used, md = prune_model(model, args.method, args.pattern, args.strategy, fam, calib, progress=not args.quiet)
    state = dict(info, stage="pruned", method=used, pattern=args.pattern, strategy=args.strategy,
                 source=args.model or f"tiny:{args.tiny}")
    save_model(model, Path(args.out), state, tokenizer_from=Path(args.model) if args.model else None)
    if md:
        (Path(args.out) / "prune_report.md").write_text(md + "\n")
    print(f"pruned {len(rows)} layers ({used}, {args.pattern}, strategy {args.strategy}) in {time.time() - t:.1f}s -> {args.out}")
    return 0


def _lora():
    return _need("sparselora.lora", "SparseLoRA"), _need("sparselora.distill", "SparseLoRA distillation")


def cmd_restore(args) -> int:
    import torch

    lora, distill = _lora()
    student, info = load_model(args.model, None, args.dtype)
    teacher, _ = load_model(args.teacher, args.teacher_tiny, args.dtype)
    teacher.eval()
    if not any(isinstance(getattr(m, "sparse_mask", None), torch.Tensor) for m in student.modules()):
        raise CLIError(f"{args.model} has no pruned layers (no {MASKS_FILE}); run 'sparselora prune' first")
    batches = calibration_batches(teacher, dict(info, tiny=args.teacher_tiny or info.get("tiny")), args.teacher or args.model,
                                  args.calib_batches, args.batch)
    out = Path(args.out)
    state = dict(info, stage="restored")
    if not args.merge:
        save_model(student, out, state, tokenizer_from=Path(args.model))  # the frozen pruned base, before adapters
    names = lora.add_sparse_lora(student, r=args.rank, alpha=args.alpha)
    stats = distill.distill(student, teacher, batches, steps=args.steps, lr=args.lr, loss=args.loss,
                            output_fn=_output_fn, progress=not args.quiet)
    state["lora"] = {"r": args.rank, "alpha": args.alpha, "names": list(names), "steps": args.steps, "loss": args.loss}
    if args.merge:
        lora.merge_sparse_lora(student)
        save_model(student, out, dict(state, stage="merged"), tokenizer_from=Path(args.model))
    else:
        from safetensors.torch import save_file

        from .checkpoint import _atomic_write

        trained = {id(p) for p in lora.lora_parameters(student)}
        adapters = {n: p.detach().cpu().contiguous() for n, p in student.named_parameters() if id(p) in trained}
        if not adapters:
            raise CLIError("add_sparse_lora attached no trainable adapters")
        _atomic_write(out / ADAPTERS_FILE, lambda tmp: save_file(adapters, tmp))
        _write_state(out, state)
    print(f"restored with SparseLoRA r={args.rank} for {args.steps} steps: {_short(stats)} -> {out}")
    return 0


def _short(stats) -> str:
    if isinstance(stats, dict):
        return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in stats.items() if not isinstance(v, (list, dict)))
    return str(stats)


def cmd_merge(args) -> int:
    from safetensors.torch import load_file

    path = Path(args.model)
    state = _read_state(path)
    if state.get("stage") == "merged":
        raise CLIError(f"{path} is already merged")
    if state.get("stage") != "restored" or not (path / ADAPTERS_FILE).exists():
        raise CLIError(f"{path} is not a 'sparselora restore' output (stage {state.get('stage')!r}, no {ADAPTERS_FILE})")
    lora, _ = _lora()
    model, info = load_model(args.model, None, args.dtype)
    cfg = state["lora"]
    lora.add_sparse_lora(model, r=cfg["r"], alpha=cfg["alpha"], names=cfg["names"])
    adapters = load_file(path / ADAPTERS_FILE)
    result = model.load_state_dict(adapters, strict=False)
    if result.unexpected_keys:
        raise CLIError(f"{path / ADAPTERS_FILE}: adapters do not fit the model: {result.unexpected_keys[:5]}")
    lora.merge_sparse_lora(model)
    save_model(model, Path(args.out), dict(info, stage="merged"), tokenizer_from=path)
    print(f"merged {len(cfg['names'])} SparseLoRA layers -> {args.out}")
    return 0


def cmd_sparsify(args) -> int:
    from .checkpoint import save_sparse
    from .patch import sparsify

    model, info = load_model(args.model, args.tiny, args.dtype)
    if args.tiny:  # a built-in model is dense: prune it by magnitude first so there is something to pack
        magnitude_24(model, args.strategy, _family_for(model, None))
    report = sparsify(model, backend=args.backend, skip=args.skip or (), tokens=args.tokens or None)
    if not report.sparse:
        raise CLIError("no pruned layers to sparsify (no sparse_mask found); run 'sparselora prune' first")
    out = Path(args.out)
    if args.format == "transformers":  # config.json quantization_config + packed model.safetensors (hf_quantizer)
        model.save_pretrained(out)
        f = out / "model.safetensors" if (out / "model.safetensors").exists() else out / "model.safetensors.index.json"
    else:
        if args.format == "compressed-tensors":
            from .compressed_tensors_interop import LEGACY_NOTE

            print(f"note: {LEGACY_NOTE}", file=sys.stderr)
        f = save_sparse(model, out, extra_config={"stage": info.get("stage"), "source": args.model or f"tiny:{args.tiny}"}, format=args.format)
    _write_state(out, dict(info, stage="sparsified", format=args.format))
    if args.model:
        _copy_tokenizer(Path(args.model), out)
    (out / "sparsify_report.md").write_text(report.to_markdown() + "\n")
    print(report.to_markdown() if args.verbose else report.summary())
    print(f"wrote {f} ({f.stat().st_size / 2**20:.2f} MiB)")
    return 0


def layer_latency(model, tokens: int, iters: int, progress: bool = True) -> list[dict]:
    """Per distinct sparse layer shape: dense F.linear on the unpacked weight vs the SparseLinear."""
    import torch
    import torch.nn.functional as F

    from .patch import sparse_layers
    from .timing import median_ms

    rows, seen = [], set()
    layers = [(n, m) for n, m in sparse_layers(model).items()]
    for name, m in _progress(layers, "timing layers", progress):
        key = (m.out_features, m.in_features, m.values.dtype)
        if key in seen:
            continue
        seen.add(key)
        x = torch.randn(tokens, m.in_features, dtype=m.values.dtype, device=m.values.device)
        w = m.dense_weight()
        dense = median_ms(lambda: F.linear(x, w, m.bias), iters, x.device, warmup=3)
        sparse = median_ms(lambda: m(x), iters, x.device, warmup=3)
        rows.append({"layer": name, "shape": f"{m.out_features}x{m.in_features}", "tokens": tokens, "backend": m.backend.name,
                     "device": str(x.device), "dense_ms": dense, "sparse_ms": sparse, "speedup": dense / sparse})
    return rows


def _progress(it, desc: str, enabled: bool):
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, leave=False)


def cmd_bench(args) -> int:
    import torch

    from .patch import sparse_layers, sparsify

    model, info = load_model(args.model, args.tiny, args.dtype)
    if args.tiny:
        magnitude_24(model, "both", _family_for(model, None))
    if not sparse_layers(model):
        sparsify(model)
    if not sparse_layers(model):
        raise CLIError("no sparse layers to benchmark: give a pruned or sparsified model directory")
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(dev)
    rows = layer_latency(model, args.tokens, args.iters, progress=not args.quiet)
    label = torch.cuda.get_device_name() if dev.type == "cuda" else "CPU (reference backend: decompress + dense matmul; not the GPU kernels)"
    print(f"layer latency on {label}, {args.tokens} tokens, median of {args.iters}")
    print("| layer shape | backend | dense ms | sparse ms | speedup |\n|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['shape']} | {r['backend']} | {r['dense_ms']:.3f} | {r['sparse_ms']:.3f} | {r['speedup']:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": label, "rows": rows}, indent=1))
    if dev.type != "cuda":
        print("for GPU end-to-end numbers run: python benchmarks/bench_e2e.py (needs CUDA)")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(args)


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
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def model_args(sp, tiny=True):
        sp.add_argument("model", nargs="?", help="model directory (transformers save_pretrained, or a sparselora output)")
        if tiny:
            sp.add_argument("--tiny", choices=TINY_FAMILIES, help="use a built-in tiny random VLM instead of a directory")
        sp.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="load the model in this dtype")
        sp.add_argument("-q", "--quiet", action="store_true", help="no progress bars")

    sp = sub.add_parser("env", help="versions, GPU and which sparse backends load here")
    sp.set_defaults(fn=cmd_env)

    sp = sub.add_parser("prune", help="prune a model's Linear layers (2:4 by default)",
                        description="Prune a model to N:M sparsity and write a pruned model directory (masks kept exactly).")
    model_args(sp)
    sp.add_argument("--method", default="wanda", choices=["wanda", "magnitude", "sparsegpt"], help="pruning criterion (default: wanda)")
    sp.add_argument("--pattern", default="2:4", help="2:4, 4:8 or a ratio such as 0.5 (default: 2:4)")
    sp.add_argument("--strategy", default="language", help="which parts: language, vision or both (default: language)")
    sp.add_argument("--family", help="model family for unknown model types (see sparselora.families)")
    sp.add_argument("--calib-batches", type=_positive_int, default=8, help="calibration batches for wanda/sparsegpt (default: 8)")
    sp.add_argument("--batch", type=_positive_int, default=4, help="calibration batch size (default: 4)")
    sp.add_argument("--out", required=True, help="output directory")
    sp.set_defaults(fn=cmd_prune)

    sp = sub.add_parser("restore", help="recover quality with SparseLoRA distillation from the dense model",
                        description="Attach SparseLoRA adapters (their update stays inside the 2:4 mask) and distil from the dense teacher.")
    model_args(sp, tiny=False)
    sp.add_argument("--teacher", help="dense teacher model directory")
    sp.add_argument("--teacher-tiny", choices=TINY_FAMILIES, help="teacher is the built-in tiny model the student was pruned from")
    sp.add_argument("--steps", type=_positive_int, default=200, help="optimizer steps (default: 200)")
    sp.add_argument("--lr", type=_positive_float, default=1e-3)
    sp.add_argument("--rank", type=_positive_int, default=16, help="LoRA rank r (default: 16)")
    sp.add_argument("--alpha", type=_positive_float, default=32, help="LoRA alpha (default: 32)")
    sp.add_argument("--loss", default="mse", choices=["kl", "mse", "cosine"], help="distillation loss (default: mse)")
    sp.add_argument("--calib-batches", type=_positive_int, default=16, help="training batches cycled over (default: 16)")
    sp.add_argument("--batch", type=_positive_int, default=8)
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
    sp.add_argument("--strategy", default="language", help="with --tiny: parts to prune by magnitude first (default: language)")
    sp.add_argument("--skip", nargs="*", help="module names to leave dense")
    sp.add_argument("--tokens", nargs="*", type=_positive_int, metavar="M",
                    help="with --backend auto: tokens per call you will run (e.g. 1 8 for decode); layers whose tuned "
                         "table says dense is faster at any of them stay dense")
    sp.add_argument("-v", "--verbose", action="store_true", help="print the per-layer report")
    sp.add_argument("--out", required=True, help="output directory")
    sp.set_defaults(fn=cmd_sparsify)

    sp = sub.add_parser("bench", help="time sparse vs dense layers (CPU here; GPU numbers with benchmarks/bench_e2e.py)")
    model_args(sp)
    sp.add_argument("--tokens", type=_positive_int, default=256, help="tokens per call (default: 256)")
    sp.add_argument("--iters", type=_positive_int, default=10)
    sp.add_argument("--device", help="cpu or cuda (default: cuda when present)")
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
    sp.add_argument("--skip-llava", action="store_true", help="only the MiniLM part")
    sp.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    sp.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sp.set_defaults(fn=cmd_demo)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "fn", None):
        parser.print_help()
        return 2
    try:
        return args.fn(args) or 0
    except CLIError as e:
        print(f"sparselora {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        # bad input found by the library (not 2:4, corrupt checkpoint...): its message names the
        # layer or tensor, a traceback would only hide it
        from .checkpoint import CheckpointError
        from .format import SparsityError

        if isinstance(e, (SparsityError, CheckpointError)):
            print(f"sparselora {args.command}: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
