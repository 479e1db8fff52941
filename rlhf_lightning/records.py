"""Reading JSONL records and checking them, with errors that name file, line and field.

Formats (one JSON object per line, UTF-8):

* SFT: ``{"prompt", "completion"}``, ``{"text"}`` or ``{"messages": [{"role", "content"}, ...]}``
* preferences: ``{"prompt", "chosen", "rejected"}`` with an optional numeric ``"margin"``; the
  prompt is a string or a list of chat messages (rendered with the chat template)
* prompts: ``{"prompt": str}`` or ``{"messages": [...]}`` (rendered with the chat template)

Extra fields are kept and ignored. A record is checked when it is read, so a bad line fails
before any training starts.
"""

from __future__ import annotations

import codecs
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import UserInputError

Record = dict[str, Any]
SFT_KINDS = ("prompt/completion", "text", "messages")

# The record families (name, stage that reads them, shapes), as a hint names them when a file
# is given to the wrong stage.
FAMILIES = {
    "sft": ("SFT data", "SFT", '{"prompt", "completion"}, {"text"} or {"messages"}'),
    "preference": ("preference pairs", "reward", '{"prompt", "chosen", "rejected"}'),
    "prompt": ("prompts", "PPO", '{"prompt"} or {"messages"}'),
}


class DataFormatError(UserInputError):
    """A record does not have the shape its stage expects.

    ``str(err)`` reads ``path:line: field 'name': what is wrong[; hint: what to try]``; the
    line is left out for problems of the whole file, the field for problems of the whole line.
    """

    def __init__(
        self, path: str | os.PathLike[str], line: int, field: str | None, message: str, *, hint: str | None = None
    ) -> None:
        self.path, self.line, self.field, self.hint = str(path), line, field, hint
        where = f"{self.path}:{line}" if line else self.path
        what = f"field '{field}': {message}" if field else message
        super().__init__(f"{where}: {what}" + (f"; hint: {hint}" if hint else ""))


def read_jsonl(path: str | os.PathLike[str], check: Callable[[Record, str, int], Record]) -> list[Record]:
    """Read every non-blank line of ``path`` as a JSON object and pass it through ``check``.

    ``check(record, path, line)`` returns the (possibly normalised) record or raises
    :class:`DataFormatError`.
    """
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(path, 0, None, "file does not exist", hint="check the path (relative to where you run)")
    data = path.read_bytes().removeprefix(codecs.BOM_UTF8)  # a BOM some editors write first
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DataFormatError(
            path, line, None, f"bytes that are not UTF-8 ({err.reason})",
            hint="re-encode the file as UTF-8, e.g. iconv -f latin1 -t utf-8",
        ) from err
    records = []
    # Lines end at "\n" only: str.splitlines would also split at U+2028, U+0085, \x1c ..., which
    # JSON strings may hold unescaped (write_jsonl writes them so).
    for number, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        if not records and raw.lstrip().startswith("["):
            raise DataFormatError(
                path, number, None, "the file is a JSON array; expected JSON Lines, one object per line",
                hint="convert it, e.g. jq -c '.[]' file.json > file.jsonl",
            )
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as err:
            raise DataFormatError(
                path, number, None, f"malformed JSON ({err.msg} at column {err.colno})",
                hint="each line must be one complete JSON object",
            ) from err
        if not isinstance(record, dict):
            raise DataFormatError(path, number, None, f"expected a JSON object, got {type(record).__name__}")
        records.append(check(record, str(path), number))
    if not records:
        raise DataFormatError(path, 0, None, "file holds no records", hint="write one JSON object per line")
    return records


def write_jsonl(path: str | os.PathLike[str], records: list[Record]) -> Path:
    """Write ``records`` as JSONL, atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp")
    with staging.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(staging, path)
    return path


def guess_family(record: Record) -> str | None:
    """Which of :data:`FAMILIES` a record resembles by its fields (None: none clearly)."""
    if "chosen" in record or "rejected" in record:
        return "preference"
    if "completion" in record or "text" in record:
        return "sft"
    messages = record.get("messages")
    if isinstance(messages, list):  # a conversation to learn from, or one to answer
        has_answer = any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages)
        return "sft" if has_answer else "prompt"
    return "prompt" if "prompt" in record else None


def wrong_family_hint(record: Record, family: str) -> str | None:
    """A hint when ``record`` looks like another stage's data than ``family`` (None otherwise),
    e.g. ``this record looks like SFT data (for the SFT stage); the reward stage reads ...``."""
    guess = guess_family(record)
    if guess is None or guess == family:
        return None
    (seen, seen_stage, _), (wanted, stage, shapes) = FAMILIES[guess], FAMILIES[family]
    return f"this record looks like {seen} (for the {seen_stage} stage); the {stage} stage reads {wanted} {shapes}"


def _string(record: Record, field: str, path: str, line: int, family: str, allow_empty: bool = False) -> str:
    if field not in record:
        raise DataFormatError(path, line, field, "missing", hint=wrong_family_hint(record, family))
    value = record[field]
    if not isinstance(value, str):
        raise DataFormatError(path, line, field, f"expected a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataFormatError(path, line, field, "empty string")
    return value


def _messages(
    record: Record, path: str, line: int, field: str = "messages", user_text: bool = False
) -> list[dict[str, str]]:
    """The checked chat turns of ``record[field]``; with ``user_text``, a user turn must hold text
    (a prompt to answer), not an empty or whitespace-only string."""
    messages = record[field]
    if not isinstance(messages, list) or not messages:
        raise DataFormatError(path, line, field, "expected a non-empty list of {role, content} objects")
    for index, message in enumerate(messages):
        where = f"{field}[{index}]"
        if not isinstance(message, dict):
            raise DataFormatError(path, line, where, "expected an object with 'role' and 'content'")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise DataFormatError(path, line, f"{where}.{key}", "missing or not a string")
        if user_text and message["role"] == "user" and not message["content"].strip():
            raise DataFormatError(path, line, f"{where}.content", "empty string (a user turn with no text to answer)")
    return messages


def sft_kind(record: Record) -> str:
    """Which SFT shape a (checked) record has: one of :data:`SFT_KINDS`."""
    if "messages" in record:
        return "messages"
    if "text" in record:
        return "text"
    return "prompt/completion"


def check_sft(record: Record, path: str, line: int) -> Record:
    if "messages" in record:
        messages = _messages(record, path, line)
        if not any(m["role"] == "assistant" for m in messages):
            raise DataFormatError(
                path, line, "messages", "no assistant turn to learn from", hint=wrong_family_hint(record, "sft")
            )
    elif "text" in record:
        _string(record, "text", path, line, "sft")
    elif "prompt" in record or "completion" in record:
        _string(record, "prompt", path, line, "sft", allow_empty=True)
        _string(record, "completion", path, line, "sft")
    else:
        raise DataFormatError(
            path, line, None,
            "not an SFT record: expected 'prompt'+'completion', 'text' or 'messages' "
            f"(found fields: {', '.join(sorted(record)) or 'none'})",
            hint=wrong_family_hint(record, "sft"),
        )
    return record


def check_preference(record: Record, path: str, line: int) -> Record:
    if "prompt" not in record and "chosen" not in record:
        raise DataFormatError(
            path, line, None,
            "not a preference record: expected 'prompt', 'chosen', 'rejected' "
            f"(found fields: {', '.join(sorted(record)) or 'none'})",
            hint=wrong_family_hint(record, "preference"),
        )
    if isinstance(record.get("prompt"), list):
        _messages(record, path, line, field="prompt", user_text=True)
    else:
        _string(record, "prompt", path, line, "preference", allow_empty=True)
    _string(record, "chosen", path, line, "preference")
    _string(record, "rejected", path, line, "preference")
    margin = record.get("margin", 0.0)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)):
        raise DataFormatError(path, line, "margin", f"expected a number, got {type(margin).__name__}")
    return record


def check_prompt(record: Record, path: str, line: int) -> Record:
    if "messages" in record:
        _messages(record, path, line, user_text=True)
    elif "prompt" in record and isinstance(record["prompt"], list):
        _messages(record, path, line, field="prompt", user_text=True)
    else:
        _string(record, "prompt", path, line, "prompt")
    return record


def read_sft(path: str | os.PathLike[str]) -> list[Record]:
    return read_jsonl(path, check_sft)


def read_preferences(path: str | os.PathLike[str]) -> list[Record]:
    """Preference pairs; pairs whose chosen equals rejected are kept (they teach nothing: their
    loss is log 2 whatever the model does) and counted in one warning, as they often mean a
    mistake upstream."""
    records = read_jsonl(path, check_preference)
    ties = sum(record["chosen"] == record["rejected"] for record in records)
    if ties:
        warnings.warn(
            f"{path}: {ties} of {len(records)} records have chosen == rejected; they are kept but "
            "teach the reward model nothing (their loss is log 2)",
            stacklevel=2,
        )
    return records


def read_prompts(path: str | os.PathLike[str]) -> list[Record]:
    return read_jsonl(path, check_prompt)
