"""What annotators judge: a prompt and two or more candidate responses.

Candidates come from a JSONL file (``{"prompt": str, "responses": [str, ...]}``, an optional
``"id"``), or are sampled from a policy folder by :class:`CandidateGenerator`, a background
thread that fills a :class:`CandidatePool` (and a candidates file, so a restart does not
sample again) while the page is already serving the first items.

An item's id is its ``"id"`` field, or a hash of its prompt and responses, so annotations stay
attached to the right item when the candidates file is reordered or grows.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..records import DataFormatError, Record, read_jsonl
from ..errors import UserInputError
from ..models import is_preset
from ..generation import GenerationSettings
from .storage import JsonlLog, read_log


@dataclass(frozen=True)
class Item:
    """One labelling task: a prompt and its candidate responses (in candidate order)."""

    id: str
    prompt: str
    responses: tuple[str, ...]

    def record(self) -> Record:
        return {"id": self.id, "prompt": self.prompt, "responses": list(self.responses)}


def content_id(prompt: str, responses: list[str] | tuple[str, ...]) -> str:
    """A stable id from the item's text (first 16 hex digits of a SHA-256)."""
    blob = json.dumps([prompt, list(responses)], ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


def check_candidate(record: Record, path: str, line: int) -> Record:
    """Check one candidates line; the message names file, line and field."""
    prompt = record.get("prompt")
    if "prompt" not in record:
        raise DataFormatError(path, line, "prompt", "missing")
    if not isinstance(prompt, str):
        raise DataFormatError(path, line, "prompt", f"expected a string, got {type(prompt).__name__}")
    if "responses" not in record:
        raise DataFormatError(path, line, "responses", "missing")
    responses = record["responses"]
    if not isinstance(responses, list):
        raise DataFormatError(path, line, "responses", f"expected a list of strings, got {type(responses).__name__}")
    if len(responses) < 2:
        raise DataFormatError(path, line, "responses", f"need at least two responses to compare, got {len(responses)}")
    for index, response in enumerate(responses):
        if not isinstance(response, str):
            got = type(response).__name__
            raise DataFormatError(path, line, f"responses[{index}]", f"expected a string, got {got}")
        if not response.strip():
            raise DataFormatError(path, line, f"responses[{index}]", "empty string")
    if "id" in record and (not isinstance(record["id"], str) or not record["id"].strip()):
        raise DataFormatError(path, line, "id", "expected a non-empty string")
    return record


def read_candidates(path: str | os.PathLike[str]) -> list[Item]:
    """The items of a candidates file, checked; two lines with the same id are an error."""
    items: list[Item] = []
    lines: dict[str, int] = {}

    def check(record: Record, where: str, line: int) -> Record:
        check_candidate(record, where, line)
        item_id = record.get("id") or content_id(record["prompt"], record["responses"])
        if item_id in lines:
            raise DataFormatError(where, line, "id", f"duplicate item {item_id!r} (first on line {lines[item_id]})")
        lines[item_id] = line
        items.append(Item(item_id, record["prompt"], tuple(record["responses"])))
        return record

    read_jsonl(path, check)
    return items


class CandidatePool:
    """The items ready to label, shared between the generator thread and the web app.

    ``expected`` is how many items there will be once generation ends (the progress bar's
    total); it shrinks when a prompt yields fewer than two distinct responses.
    """

    def __init__(self, items: list[Item] | None = None, expected: int | None = None) -> None:
        self._lock = threading.Lock()
        self._items: dict[str, Item] = {}
        self._expected = expected
        self._finished = expected is None
        self.error: str | None = None
        for item in items or []:
            self.add(item)

    def add(self, item: Item) -> None:
        with self._lock:
            self._items.setdefault(item.id, item)

    def drop_expected(self) -> None:
        with self._lock:
            if self._expected is not None:
                self._expected -= 1

    def finish(self, error: str | None = None) -> None:
        with self._lock:
            self._finished, self.error = True, error

    def items(self) -> list[Item]:
        with self._lock:
            return list(self._items.values())

    def get(self, item_id: str) -> Item | None:
        with self._lock:
            return self._items.get(item_id)

    @property
    def finished(self) -> bool:
        return self._finished

    @property
    def total(self) -> int:
        with self._lock:
            ready = len(self._items)
            return ready if self._finished or self._expected is None else max(ready, self._expected)


@dataclass
class SamplingSettings:
    """How candidates are sampled: ``k`` responses per prompt, with the package's sampler and the
    PPO rollout's :class:`~rlhf_lightning.generation.GenerationSettings`."""

    k: int = 2
    generation: GenerationSettings = field(default_factory=lambda: GenerationSettings(max_new_tokens=64))
    seed: int = 0
    max_tries: int = 3  # extra draws when a prompt yields fewer than k distinct, non-blank responses

    def __post_init__(self) -> None:
        if self.k < 2:
            raise UserInputError(f"--k must be at least 2 (responses to compare per prompt), got {self.k}")
        if self.generation.max_new_tokens < 1:
            raise UserInputError(f"--max-new-tokens must be at least 1, got {self.generation.max_new_tokens}")
        if self.generation.temperature <= 0:
            raise UserInputError(f"--temperature must be > 0, got {self.generation.temperature}")


def check_policy(policy: str) -> None:
    """Fail fast (before the server starts) when the policy folder is missing."""
    if not is_preset(policy) and not Path(os.path.expanduser(policy)).is_dir():
        raise UserInputError(
            f"policy folder '{policy}' does not exist; hint: pass the export folder of the SFT "
            "stage (e.g. outputs/demo/sft/model)"
        )


class CandidateGenerator(threading.Thread):
    """Samples ``k`` responses per prompt in the background, appending each item to
    ``out_path`` (fsync'ed) and to ``pool`` as soon as it is ready.

    Prompts whose item is already in ``out_path`` (an earlier run, same prompt at the same
    position) are not sampled again; the file is also a valid ``--candidates`` file.
    Sampling is seeded per prompt (``seed + prompt index``), so a restart reproduces it.
    """

    def __init__(self, policy: str, prompt_records: list[Record], out_path: str | os.PathLike[str],
                 pool: CandidatePool, settings: SamplingSettings) -> None:
        super().__init__(name="candidate-generator", daemon=True)
        self.policy, self.out = policy, JsonlLog(out_path)
        self.prompt_records = prompt_records  # read (and checked) by the caller, before serving
        self.pool, self.settings = pool, settings
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        try:
            self._generate()
        except Exception as err:  # shown on the page and printed; the items so far stay usable
            self.pool.finish(error=f"candidate generation failed: {type(err).__name__}: {err}")
            print(f"error: {self.pool.error}", flush=True)
        else:
            self.pool.finish()

    def _generate(self) -> None:
        from ..data.encoding import prompt_record_text
        from ..generation import sample_texts
        from ..models import load_causal_lm, load_tokenizer

        tokenizer = load_tokenizer(self.policy)
        prompts = [prompt_record_text(record, tokenizer) for record in self.prompt_records]
        # (prompt index, prompt) -> item of an earlier run; the index tells repeated prompts apart
        earlier = {(r.get("prompt_index"), r["prompt"]): r for r in read_log(self.out.path)}
        todo = []
        for index, prompt in enumerate(prompts):
            record = earlier.get((index, prompt))
            if record is None:
                todo.append((index, prompt))
            else:
                self.pool.add(Item(record["id"], prompt, tuple(record["responses"])))
        if not todo:
            return
        model = load_causal_lm(self.policy, tokenizer)
        s = self.settings
        for index, prompt in todo:
            if self._stop_event.is_set():
                return
            responses: list[str] = []
            for attempt in range(1 + s.max_tries):
                texts = sample_texts(model, tokenizer, [prompt] * s.k, seed=s.seed + index + attempt * len(prompts),
                                     **asdict(s.generation))
                for text in texts:  # one by one: a draw can repeat itself, not only an earlier draw
                    if text.strip() and text not in responses:
                        responses.append(text)
                if len(responses) >= s.k:
                    break
            responses = responses[: s.k]
            if len(responses) < 2:
                print(f"warning: prompt {index + 1} gave fewer than 2 distinct responses; left out", flush=True)
                self.pool.drop_expected()
                continue
            item = Item(content_id(prompt, responses), prompt, tuple(responses))
            self.out.append({**item.record(), "prompt_index": index})
            self.pool.add(item)
