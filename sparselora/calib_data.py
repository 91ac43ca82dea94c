"""Calibration and training data: what ``prune``, ``restore`` and the demo feed the model.

Images and prompts for a VLM (:func:`load_calib`, then :func:`render`):

* an image folder, with a prompts file (one prompt per line) or the bundled prompts;
* a JSONL file of ``{"image": path, "text": prompt}`` lines (``"answer"`` optional; image paths
  relative to the file; a line without ``"image"`` is a text-only sample);
* a ``datasets`` dataset written by ``save_to_disk`` (needs the ``datasets`` package): its first
  image column and its first text column among text/prompt/question/caption/instruction;
* a ``.txt`` file: one text-only sample per non-empty line (for a text model, your own domain's
  text; the CLI tokenizes it with the model's tokenizer, :func:`text_batches`);
* nothing: the offline default, images that ship with installed packages (matplotlib's sample
  data, scikit-image's ``data`` module when installed) with the bundled prompts.

:func:`load_calib` reads and checks everything (every image is decoded) before a model is loaded,
so a missing folder, an empty file or an unreadable image is one error naming the option.
:func:`render` turns the samples into ``model(**batch)`` dicts with the model's own processor and
chat template (``AutoProcessor`` from the model directory).

Text: without ``--calib``, a text model calibrates on the sentences of
:func:`sparselora.text_sources.calibration_texts` (several kinds of text that ship with Python and
installed packages, mixed). Tiny models (:mod:`sparselora.tiny_models`, which have no
processor): random but valid inputs built from the config (:func:`tiny_batches`).
"""
from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
TEXT_COLUMNS = ("text", "prompt", "question", "caption", "instruction")
# files AutoProcessor builds an image (or video) processor from
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")

# bundled prompts: varied instructions of the kind a VLM is asked (calibration only needs realistic
# activations, not answers)
PROMPTS = (
    "Describe this image in detail.",
    "What is the main subject of this picture, and what is it doing?",
    "List the objects you can see in the image and where they are.",
    "What colors dominate this image? Describe the lighting.",
    "Write a short caption for this photo.",
    "Is there any text in the image? If so, what does it say?",
    "What might have happened just before this picture was taken?",
    "Describe the background of the image and the mood it conveys.",
    "How many distinct objects are in this image? Explain how you counted.",
    "Explain what this image could be used for in a presentation.",
    "What questions would a curious child ask about this picture?",
    "Compare the left half of the image with the right half.",
)


class CalibDataError(ValueError):
    """Calibration data that cannot be used; the message names the option and the file."""


@dataclass
class Sample:
    image: Any  # a Path, a PIL image (datasets), or None for a text-only sample
    text: str
    answer: Optional[str] = None


@dataclass
class CalibData:
    samples: list[Sample]
    source: str  # what the samples came from, for messages and sparselora.json

    @property
    def has_images(self) -> bool:
        return any(s.image is not None for s in self.samples)


def default_image_paths() -> list[Path]:
    """Images that ship with installed packages: matplotlib's sample data, scikit-image's data."""
    found: list[Path] = []
    try:
        import matplotlib

        sample = Path(matplotlib.get_data_path()) / "sample_data"
        found += [sample / n for n in ("grace_hopper.jpg", "logo2.png", "Minduka_Present_Blue_Pack.png")]
    except ImportError:
        pass
    try:
        import skimage

        data = Path(skimage.__file__).parent / "data"
        found += [data / n for n in ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png")]
    except ImportError:
        pass
    return [p for p in found if p.is_file()]


def _open_image(path, option: str):
    """Decode an image fully (a truncated file fails here, not inside the model's processor)."""
    try:
        from PIL import Image
    except ImportError:
        raise CalibDataError(f"{option}: reading images needs Pillow (pip install pillow)") from None
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (OSError, ValueError, SyntaxError) as e:  # PIL: UnidentifiedImageError is an OSError; SyntaxError for some corrupt PNGs
        raise CalibDataError(f"{option}: cannot read image {path} ({' '.join(str(e).split())})") from None


def _read_prompts(path: str, option: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise CalibDataError(f"{option} {path}: no such file")
    try:
        lines = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise CalibDataError(f"{option} {path}: cannot read it ({e})") from None
    prompts = [ln for ln in lines if ln]
    if not prompts:
        raise CalibDataError(f"{option} {path}: no prompts (the file is empty)")
    return prompts


def _pair(images: list, prompts, n: int) -> list[Sample]:
    """n samples: every image in turn, each with the next prompt (both cycled)."""
    return [Sample(images[i % len(images)], prompts[i % len(prompts)]) for i in range(n)]


def _from_folder(folder: Path, prompts_file: Optional[str], n: int, option: str) -> CalibData:
    images = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise CalibDataError(f"{option} {folder}: no images in the folder (looked for {', '.join(IMAGE_SUFFIXES)})")
    prompts = _read_prompts(prompts_file, "--calib-prompts") if prompts_file else list(PROMPTS)
    return CalibData(_pair(images, prompts, n), f"{folder} ({len(images)} images, "
                     f"{'prompts from ' + prompts_file if prompts_file else 'bundled prompts'})")


def _cycled(samples: list, n: int) -> list:
    """``n`` samples, repeating ``samples`` in order when there are fewer."""
    return [samples[i % len(samples)] for i in range(n)]


def _from_jsonl(path: Path, n: int, option: str) -> CalibData:
    samples: list[Sample] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise CalibDataError(f"{option} {path}: cannot read it ({e})") from None
    for k, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise CalibDataError(f"{option} {path}:{k}: not JSON ({e})") from None
        if not isinstance(row, dict):
            raise CalibDataError(f"{option} {path}:{k}: expected an object like {{\"image\": \"a.jpg\", \"text\": \"...\"}}")
        text = next((row[c] for c in TEXT_COLUMNS if isinstance(row.get(c), str) and row[c].strip()), None)
        if text is None:
            raise CalibDataError(f"{option} {path}:{k}: no text (give one of the keys {', '.join(TEXT_COLUMNS)})")
        image = row.get("image")
        if image is not None:
            if not isinstance(image, str):
                raise CalibDataError(f"{option} {path}:{k}: 'image' must be a file path")
            image = (path.parent / image) if not Path(image).is_absolute() else Path(image)
            if not image.is_file():
                raise CalibDataError(f"{option} {path}:{k}: image {image} does not exist")
        answer = row.get("answer")
        samples.append(Sample(image, text, answer if isinstance(answer, str) else None))
    if not samples:
        raise CalibDataError(f"{option} {path}: no samples (the file is empty)")
    return CalibData(_cycled(samples, n), f"{path} ({len(samples)} samples)")


def _from_lines(path: Path, n: int, option: str) -> CalibData:
    """One text-only sample per non-empty line of a text file (cycled up to ``n``)."""
    try:
        lines = [x.strip() for x in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise CalibDataError(f"{option} {path}: cannot read it as UTF-8 text ({e})") from None
    samples = [Sample(None, x) for x in lines if x]
    if not samples:
        raise CalibDataError(f"{option} {path}: no text (the file has no non-empty line)")
    if len(samples) < n:
        log.warning("%s %s: %d lines for %d samples; each line is used about %d times", option, path, len(samples), n,
                    -(-n // len(samples)))
    return CalibData(_cycled(samples, n), f"{path} ({len(samples)} lines)")


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_info.json").is_file() or (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file()


def _from_dataset(folder: Path, n: int, option: str) -> CalibData:
    try:
        import datasets
    except ImportError:
        raise CalibDataError(f"{option} {folder} is a 'datasets' save_to_disk directory; reading it needs the datasets "
                             "package, which is not installed (pip install datasets)") from None
    try:
        ds = datasets.load_from_disk(str(folder))
    except Exception as e:  # the package's own errors: corrupt arrow files, wrong version...
        raise CalibDataError(f"{option} {folder}: cannot load the dataset ({type(e).__name__}: {' '.join(str(e).split())})") from None
    if hasattr(ds, "keys") and not hasattr(ds, "column_names") or isinstance(getattr(ds, "column_names", None), dict):
        split = "train" if "train" in ds else sorted(ds)[0]  # a DatasetDict: the train split, else the first
        ds = ds[split]
    cols = list(ds.column_names)
    text_col = next((c for c in TEXT_COLUMNS if c in cols), None)
    if text_col is None:
        raise CalibDataError(f"{option} {folder}: no text column (columns: {', '.join(cols)}; expected one of {', '.join(TEXT_COLUMNS)})")
    image_col = next((c for c in ("image", "images", "img", "picture") if c in cols), None)
    rows = min(len(ds), n)
    if rows == 0:
        raise CalibDataError(f"{option} {folder}: the dataset has no rows")
    samples = []
    for i in range(rows):
        row = ds[i]
        image = row.get(image_col) if image_col else None
        if isinstance(image, list):
            image = image[0] if image else None
        if isinstance(image, str):
            image = Path(image) if Path(image).is_absolute() else folder / image
        samples.append(Sample(image, str(row[text_col]), row.get("answer") if isinstance(row.get("answer"), str) else None))
    return CalibData(_cycled(samples, n), f"{folder} (dataset, {len(ds)} rows, columns {image_col}/{text_col})")


def load_calib(spec: Optional[str] = None, prompts: Optional[str] = None, n: int = 32, option: str = "--calib") -> CalibData:
    """Read and check ``n`` calibration samples (see the module docstring for what ``spec`` may be;
    None: the offline default). Every image is decoded here, so bad data fails before a model loads."""
    if n < 1:
        raise CalibDataError(f"{option}: the number of samples must be positive, got {n}")
    if spec is None:
        if prompts:
            raise CalibDataError("--calib-prompts needs --calib IMAGE_FOLDER (the images the prompts go with)")
        images = default_image_paths()
        if not images:
            raise CalibDataError(f"no {option} given and no offline default images found (they ship with matplotlib or "
                                 "scikit-image: pip install matplotlib), so give --calib IMAGE_FOLDER or a JSONL file")
        data = CalibData(_pair(images, PROMPTS, n), f"offline default ({len(images)} images from installed packages, bundled prompts)")
    else:
        path = Path(spec)
        if not path.exists():
            raise CalibDataError(f"{option} {spec}: no such file or folder")
        if path.is_dir() and _is_saved_dataset(path):
            data = _from_dataset(path, n, option)
        elif path.is_dir():
            data = _from_folder(path, prompts, n, option)
        elif path.suffix.lower() in (".jsonl", ".json"):
            data = _from_jsonl(path, n, option)
        elif path.suffix.lower() == ".txt":
            data = _from_lines(path, n, option)
        else:
            raise CalibDataError(f"{option} {spec}: expected an image folder, a .jsonl or .txt file or a datasets save_to_disk folder")
        if prompts and not path.is_dir() or prompts and _is_saved_dataset(path):
            raise CalibDataError("--calib-prompts goes with an image folder; a JSONL file or dataset carries its own text")
    checked: dict = {}
    for s in data.samples:  # decode every image once (they repeat when n exceeds the data)
        if isinstance(s.image, Path):
            key = str(s.image)
            if key not in checked:
                checked[key] = _open_image(s.image, option)
    return data


# --------------------------------------------------------------------------- rendering
def has_processor(model_dir) -> bool:
    """Whether ``model_dir`` holds an image processor that AutoProcessor can build (no model load)."""
    return model_dir is not None and any((Path(model_dir) / f).is_file() for f in PROCESSOR_FILES)


def load_processor(model_dir):
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(model_dir)
    except Exception as e:  # transformers raises many types for a broken processor
        raise CalibDataError(f"{model_dir}: cannot build its processor ({type(e).__name__}: {' '.join(str(e).split())})") from None


def _tokenizer(processor):
    return getattr(processor, "tokenizer", processor)


def _chat_text(processor, s: Sample, with_image: bool) -> str:
    """The sample as the model is prompted: through the processor's chat template when it has one."""
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": s.text}]
    messages = [{"role": "user", "content": content}]
    if s.answer:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": s.answer}]})
    template = getattr(processor, "chat_template", None) or getattr(_tokenizer(processor), "chat_template", None)
    if template:
        return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=not s.answer)
    token = getattr(processor, "image_token", None) or "<image>"  # no template: the plain "<image>\nprompt" form
    return (f"{token}\n" if with_image else "") + s.text + (f" {s.answer}" if s.answer else "")


def _truncate(processor, text: str, max_tokens: Optional[int]) -> str:
    """At most ``max_tokens`` text tokens of a prompt (image tokens come on top: cutting those would
    break the image/token correspondence the model checks)."""
    if not max_tokens:
        return text
    tok = _tokenizer(processor)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= max_tokens else tok.decode(ids[:max_tokens], skip_special_tokens=True)


def render(data: CalibData, processor, batch: int = 4, max_text_tokens: Optional[int] = None) -> list[dict]:
    """``model(**batch)`` dicts from the samples, through the model's processor and chat template.
    Consecutive samples are batched (padded); a batch never mixes samples with and without an image."""
    from PIL import Image

    has_image_proc = getattr(processor, "image_processor", None) is not None
    tok = _tokenizer(processor)
    if getattr(tok, "pad_token", None) is None and getattr(tok, "eos_token", None) is not None:
        tok.pad_token = tok.eos_token  # batching pads; many causal LMs ship without a pad token
    groups: list[list[Sample]] = []
    for s in data.samples:
        img = s.image is not None and has_image_proc
        if groups and len(groups[-1]) < batch and (groups[-1][0].image is not None and has_image_proc) == img:
            groups[-1].append(s)
        else:
            groups.append([s])
    out = []
    for g in groups:
        with_image = g[0].image is not None and has_image_proc
        texts = [_chat_text(processor, Sample(s.image, _truncate(processor, s.text, max_text_tokens), s.answer), with_image) for s in g]
        kw: dict = dict(text=texts, return_tensors="pt", padding=True)
        if with_image:
            imgs = [s.image.convert("RGB") if isinstance(s.image, Image.Image) else _open_image(s.image, "--calib") for s in g]
            try:
                enc = processor(images=imgs, **kw)
            except (ValueError, TypeError):  # processors that take a list of images per sample (Idefics3, SmolVLM)
                enc = processor(images=[[im] for im in imgs], **kw)
        else:
            enc = tok(texts, return_tensors="pt", padding=True)
        out.append(dict(enc))
    return out


# --------------------------------------------------------------------------- text and tiny models
def docstring_sentences(limit: int = 400) -> list[str]:
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


def text_batches(tokenizer, sentences: list[str], batch: int, max_length: int, by_length: bool = False,
                 seed: int = 0) -> list[dict]:
    """Tokenised batches of ``batch`` sentences, each padded to its longest (at most ``max_length``).

    ``by_length``: sentences of similar token length are batched together, and the batches come in
    a random order drawn from ``seed``. Padding is compute that teaches nothing: on mixed prose a
    random batch of 16 is about 45 % padding, a length-sorted one under 1 %.
    A tokenizer without a pad token (many causal LMs) pads with its end-of-sequence token."""
    if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None) is not None:
        tokenizer.pad_token = tokenizer.eos_token  # the attention mask marks the padding, whatever its id
    if by_length:
        lengths = [len(ids) for ids in tokenizer(sentences, truncation=True, max_length=max_length)["input_ids"]]
        sentences = [sentences[i] for i in sorted(range(len(sentences)), key=lambda i: (lengths[i], i))]
    out = []
    for i in range(0, len(sentences), batch):
        chunk = sentences[i:i + batch]
        if chunk:
            enc = tokenizer(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            out.append(dict(enc))
    if by_length:  # not short-to-long: whatever cycles over them (a schedule, an epoch) sees a mix
        random.Random(seed).shuffle(out)
    return out


def tiny_batches(family: str, model, n: int, batch: int = 2, seed: int = 100) -> list[dict]:
    from .tiny_models import example_inputs

    return [example_inputs(family, model, batch=batch, seed=seed + i) for i in range(n)]
