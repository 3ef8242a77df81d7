"""Prompt templates of the model rewards, read at run time from the reward models' own code.

The released HPSv3 and VideoAlign heads were trained on their authors' instruction texts; scores are only
comparable to the paper's with exactly those texts. This project ships none of them: they are read from the
official sources the user installs (the ``hpsv3`` package; a VideoAlign checkout, which the paper's setup clones
anyway), by parsing the source file, never by importing or running it. A plain text file may stand in for
either. Only when no official source is found do the engine's own short templates apply, with a warning.

A template is a text holding ``{prompt}`` once (``{text_prompt}``, the official name, is accepted in files);
the prompt replaces it verbatim.
"""
from __future__ import annotations

import ast
import importlib.util
import warnings
from pathlib import Path

from ..errors import StreamT1Error

PLACEHOLDER = "{prompt}"
_OFFICIAL_PLACEHOLDER = "{text_prompt}"

# Fallbacks: our own texts with the checkpoints' reward tokens; scores under them are not the paper's.
HPSV3_FALLBACK = (
    "You are rating an AI-generated image for human preference. Consider its visual quality (plausible content, "
    "clarity, detail, composition, colour) and how well it follows the text prompt; 0 is the worst, 10 the best.\n"
    "Text prompt: {prompt}\n"
    "Overall rating of this image: <|Reward|>")

VIDEOALIGN_FALLBACK = (
    "You are rating an AI-generated video on three separate criteria, each from 0 (worst) to 10 (best).\n"
    "Visual quality (clarity, detail, plausibility and aesthetics of the frames): <|VQ_reward|>\n"
    "Motion quality (stable, natural, smooth and sufficiently large movement): <|MQ_reward|>\n"
    "Text prompt: {prompt}\n"
    "Alignment with the text prompt (subjects, actions, scene, style, camera): <|TA_reward|>")

# Where the texts live in the official code (paths relative to the package / checkout root).
HPSV3_SOURCE_FILE = Path("dataset") / "data_collator_qwen.py"
VIDEOALIGN_SOURCE_FILE = Path("prompt_template.py")
# VideoAlign's ``prompt_template_type`` -> the constant build_prompt formats for it. Only the type with reward
# tokens can be scored at the tokens; the others end in free text.
VIDEOALIGN_TYPES = {"detailed_special": "DETAILED_PROMPT_WITH_SPECIAL_TOKEN"}

_warned: set[str] = set()


def warn_fallback(what: str, how: str) -> None:
    """Warn once per reward kind that its scores are not comparable with the published ones."""
    if what in _warned:
        return
    _warned.add(what)
    warnings.warn(f"{what}: no official prompt template found ({how}); using the engine's own template, so scores "
                  "are NOT comparable to the paper's or the model card's", UserWarning, stacklevel=4)


def source_constants(path: Path, what: str) -> dict:
    """Module-level ``NAME = <literal>`` assignments of a Python file, parsed without running it."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (OSError, SyntaxError, ValueError) as exc:
        raise StreamT1Error(f"{what}: cannot read the prompt templates in {path}: {exc}") from None
    constants = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                constants[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                continue  # not a literal (a call, a comprehension): not a template
    return constants


def _official_text(constants: dict, name: str, path: Path, what: str) -> str:
    text = constants.get(name)
    if not isinstance(text, str):
        raise StreamT1Error(f"{what}: {path} has no string {name} (not the official source?)")
    try:  # the official code calls .format(text_prompt=...): keep its escaping, leave our placeholder in
        return text.format(text_prompt=PLACEHOLDER)
    except (KeyError, IndexError, ValueError) as exc:
        raise StreamT1Error(f"{what}: {name} in {path} has fields other than {{text_prompt}}: {exc}") from None


def text_file_template(path: Path, what: str) -> str:
    """A template written out as a text file, used as is (``{text_prompt}`` is read as ``{prompt}``)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise StreamT1Error(f"{what}: cannot read the template file {path}: {exc}") from None
    if PLACEHOLDER not in text and _OFFICIAL_PLACEHOLDER in text:
        text = text.replace(_OFFICIAL_PLACEHOLDER, PLACEHOLDER)
    return text


def installed_package_dir(name: str) -> Path | None:
    """Folder of an installed package, found without importing it (its import may need heavy dependencies)."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    return Path(locations[0]) if locations else None


def _source_in(directory: Path, relative: Path, package: str) -> Path | None:
    for candidate in (directory / relative, directory / package / relative):
        if candidate.is_file():
            return candidate
    return None


def _given_source(source, file_name: str, package: str, what: str, kind: str) -> Path:
    """A user-given template source: the official Python file inside a folder, or the file itself."""
    path = Path(source).expanduser()
    if path.is_dir():
        found = _source_in(path, file_name, package)
        if found is None:
            raise StreamT1Error(f"{what}: {path} holds no {file_name} ({kind})")
        return found
    if not path.is_file():
        raise StreamT1Error(f"{what}: template source {path} does not exist")
    return path


def hpsv3_template(source: str | None) -> tuple[str | None, str]:
    """(template, where it came from) for HPSv3: ``INSTRUCTION`` (formatted) + ``prompt_with_special_token`` of
    ``hpsv3/dataset/data_collator_qwen.py``, as its inferencer builds the text with ``use_special_tokens``.

    ``source``: the hpsv3 package folder or a checkout of its repository, that Python file, or a text file with
    the whole template; None looks for the installed ``hpsv3`` package. Template None: nothing found.
    """
    what = "HPSv3"
    if source is None:
        package = installed_package_dir("hpsv3")
        path = _source_in(package, HPSV3_SOURCE_FILE, "hpsv3") if package is not None else None
        if path is None:
            return None, "the hpsv3 package is not installed"
    else:
        path = _given_source(source, HPSV3_SOURCE_FILE, "hpsv3", what, "the hpsv3 package or repository")
        if path.suffix != ".py":
            return text_file_template(path, what), str(path)
    constants = source_constants(path, what)
    instruction = _official_text(constants, "INSTRUCTION", path, what)
    reward_line = constants.get("prompt_with_special_token")
    if not isinstance(reward_line, str):
        raise StreamT1Error(f"{what}: {path} has no string prompt_with_special_token (not the official source?)")
    return instruction + reward_line, str(path)


def videoalign_template(source: str | Path | None, template_type: str, search: list[Path]) -> tuple[str | None, str]:
    """(template, where it came from) for VideoAlign: the constant its ``build_prompt`` formats for
    ``template_type`` (the checkpoint's ``data_config.prompt_template_type``) in ``prompt_template.py``.

    ``source``: a VideoAlign checkout, its ``prompt_template.py``, or a text file with the whole template; None
    looks in ``search`` (folders, each also with a ``VideoAlign/`` subfolder). Template None: nothing found.
    """
    what = "VideoAlign"
    if source is None:
        path = next((p for d in search if (p := _source_in(d, VIDEOALIGN_SOURCE_FILE, "VideoAlign")) is not None),
                    None)
        if path is None:
            return None, "pass template_source=<VideoAlign checkout>"
    else:
        path = _given_source(source, VIDEOALIGN_SOURCE_FILE, "VideoAlign", what, "a VideoAlign checkout")
        if path.suffix != ".py":
            return text_file_template(path, what), str(path)
    if template_type not in VIDEOALIGN_TYPES:
        raise StreamT1Error(f"{what}: prompt_template_type {template_type!r} has no reward tokens; the engine scores "
                            f"at the tokens of {sorted(VIDEOALIGN_TYPES)}")
    constants = source_constants(path, what)
    return _official_text(constants, VIDEOALIGN_TYPES[template_type], path, what), str(path)
