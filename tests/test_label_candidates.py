"""Candidates: reading and checking the file, sampling from a policy, and the CLI's bad-input lines."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest

from rlhf_lightning.cli import main
from rlhf_lightning.records import DataFormatError
from rlhf_lightning.errors import UserInputError
from rlhf_lightning.labelling import candidates as candidates_module
from rlhf_lightning.labelling import cli as label_cli
from rlhf_lightning.labelling.candidates import (
    CandidateGenerator,
    CandidatePool,
    SamplingSettings,
    content_id,
    read_candidates,
)
from rlhf_lightning.labelling.storage import make_judgement, read_log
from rlhf_lightning.generation import GenerationSettings
from tests.conftest import write_lines


def test_items_get_their_id_or_a_stable_content_id(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "c.jsonl", [
        {"prompt": "P1", "responses": ["a", "b"]},
        "",
        {"prompt": "", "responses": ["x", "y", "z"], "id": "mine", "extra": 1},
    ])
    first, second = read_candidates(path)
    assert first.id == content_id("P1", ["a", "b"]) and first.responses == ("a", "b")
    assert second.id == "mine" and second.prompt == "" and len(second.responses) == 3
    assert read_candidates(path)[0].id == first.id  # stable across reads (and restarts)


@pytest.mark.parametrize(("line", "message"), [
    ('{"prompt": "P", "responses": ["a", "b"]', r"c\.jsonl:2: malformed JSON"),
    ({"prompt": "P"}, r"c\.jsonl:2: field 'responses': missing"),
    ({"responses": ["a", "b"]}, r"c\.jsonl:2: field 'prompt': missing"),
    ({"prompt": 3, "responses": ["a", "b"]}, r"c\.jsonl:2: field 'prompt': expected a string, got int"),
    ({"prompt": "P", "responses": "ab"}, r"c\.jsonl:2: field 'responses': expected a list of strings, got str"),
    ({"prompt": "P", "responses": ["only one"]},
     r"c\.jsonl:2: field 'responses': need at least two responses to compare, got 1"),
    ({"prompt": "P", "responses": ["a", 7]}, r"c\.jsonl:2: field 'responses\[1\]': expected a string, got int"),
    ({"prompt": "P", "responses": [" ", "b"]}, r"c\.jsonl:2: field 'responses\[0\]': empty string"),
    ({"prompt": "P0", "responses": ["a", "b"]}, r"c\.jsonl:2: field 'id': duplicate item .* \(first on line 1\)"),
])
def test_bad_candidates_name_file_line_and_field(tmp_path: Path, line: object, message: str) -> None:
    path = write_lines(tmp_path / "c.jsonl", [{"prompt": "P0", "responses": ["a", "b"]}, line])
    with pytest.raises(DataFormatError, match=message):
        read_candidates(path)


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().err


def test_cli_prints_one_line_and_exits_2_on_a_bad_candidates_file(tmp_path: Path, capsys) -> None:
    path = write_lines(tmp_path / "c.jsonl", [{"prompt": "P", "responses": ["a", "b"]},
                                              {"prompt": "P", "responses": ["a"]}])
    code, err = run_cli(["label", "--candidates", str(path), "--annotations", str(tmp_path / "a.jsonl")], capsys)
    assert code == 2
    assert err == f"error: {path}:2: field 'responses': need at least two responses to compare, got 1\n"


def test_cli_missing_policy_folder(tmp_path: Path, capsys) -> None:
    prompts = write_lines(tmp_path / "p.jsonl", [{"prompt": "Review:"}])
    code, err = run_cli(["label", "--policy", str(tmp_path / "no-model"), "--prompts", str(prompts),
                         "--annotations", str(tmp_path / "a.jsonl")], capsys)
    assert code == 2 and "policy folder" in err and "no-model' does not exist" in err and err.count("\n") == 1


def test_cli_bad_prompts_file_fails_before_serving(tmp_path: Path, capsys, byte_gpt2_dir: Path) -> None:
    prompts = write_lines(tmp_path / "p.jsonl", [{"prompt": "ok"}, {"prompt": ""}])
    capsys.readouterr()  # the fixture's own output
    code, err = run_cli(["label", "--policy", str(byte_gpt2_dir), "--prompts", str(prompts),
                         "--annotations", str(tmp_path / "a.jsonl")], capsys)
    assert code == 2 and err == f"error: {prompts}:2: field 'prompt': empty string\n"


def test_cli_port_in_use(tmp_path: Path, capsys) -> None:
    path = write_lines(tmp_path / "c.jsonl", [{"prompt": "P", "responses": ["a", "b"]}])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, err = run_cli(["label", "--candidates", str(path), "--annotations", str(tmp_path / "a.jsonl"),
                             "--port", str(port)], capsys)
    assert code == 2 and f"port {port} on 127.0.0.1 is in use" in err


JUDGEMENT = make_judgement(annotator="ann", item="i", prompt="P", responses=["a", "b"], shown=[0, 1],
                           choice="left", ranking=[0, 1])


@pytest.mark.parametrize(("line", "message"), [
    ('{"event": "judgement", "id": ', r"a\.jsonl:2: not a JSON line"),
    ({"prompt": "P", "responses": ["a", "b"]},  # a candidates file given as --annotations
     r"a\.jsonl:2: field 'event': expected 'judgement' or 'undo', got None; hint: is this an annotations file"),
    ({k: v for k, v in JUDGEMENT.items() if k != "annotator"}, r"a\.jsonl:2: field 'annotator': missing"),
    ({**JUDGEMENT, "shown": "01"}, r"a\.jsonl:2: field 'shown': expected a list, got str"),
    ({**JUDGEMENT, "choice": "best"}, r"a\.jsonl:2: field 'choice': expected one of left, right, ranking, tie, skip"),
    ({"event": "undo", "id": "u", "annotator": "ann"}, r"a\.jsonl:2: field 'undoes': missing"),
], ids=["malformed-json", "not-an-event", "field-missing", "field-wrong-type", "unknown-choice", "undo-without-target"])
def test_cli_bad_annotations_file_fails_before_serving(tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch,
                                                       line: object, message: str) -> None:
    candidates = write_lines(tmp_path / "c.jsonl", [{"prompt": "P", "responses": ["a", "b"]}])
    annotations = write_lines(tmp_path / "a.jsonl", [JUDGEMENT, line, JUDGEMENT])  # the bad line in the middle
    monkeypatch.setattr(label_cli, "make_server", lambda *a: pytest.fail("served despite a bad annotations file"))
    code, err = run_cli(["label", "--candidates", str(candidates), "--annotations", str(annotations)], capsys)
    assert code == 2 and re.match(f"error: .*{message}", err) and err.count("\n") == 1
    code, err = run_cli(["label", "export", "--annotations", str(annotations), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and re.match(f"error: .*{message}", err)  # export checks it the same way


def test_cli_unreadable_annotations_or_guidelines_fail_before_serving(tmp_path: Path, capsys,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    candidates = write_lines(tmp_path / "c.jsonl", [{"prompt": "P", "responses": ["a", "b"]}])
    monkeypatch.setattr(label_cli, "make_server", lambda *a: pytest.fail("served despite bad input"))
    args = ["label", "--candidates", str(candidates), "--annotations"]
    code, err = run_cli([*args, str(tmp_path)], capsys)  # a folder
    assert code == 2 and err == f"error: {tmp_path}: cannot read it (Is a directory)\n"
    annotations, missing, blank = str(tmp_path / "a.jsonl"), tmp_path / "none.md", tmp_path / "blank.md"
    code, err = run_cli([*args, annotations, "--guidelines", str(missing)], capsys)
    assert code == 2 and err == f"error: --guidelines {missing}: cannot read it (No such file or directory)\n"
    blank.write_text(" \n", encoding="utf-8")
    code, err = run_cli([*args, annotations, "--guidelines", str(blank)], capsys)
    assert code == 2 and err == f"error: --guidelines {blank}: the file is empty\n"


def test_cli_needs_a_source_of_candidates(tmp_path: Path, capsys) -> None:
    code, err = run_cli(["label", "--annotations", str(tmp_path / "a.jsonl")], capsys)
    assert code == 2 and "nothing to label" in err


def test_sampling_settings_are_checked() -> None:
    with pytest.raises(UserInputError, match="--k must be at least 2"):
        SamplingSettings(k=1)
    with pytest.raises(UserInputError, match="--temperature must be > 0"):
        SamplingSettings(generation=GenerationSettings(temperature=0))


def test_generator_samples_k_distinct_responses_per_prompt_and_resumes(
    tmp_path: Path, byte_gpt2_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prompts = [{"prompt": "Review: The movie was"}, {"messages": [{"role": "user", "content": "Hi"}]},
               {"prompt": "Review: The movie was"}]  # a repeated prompt is its own item
    out = tmp_path / "ann.candidates.jsonl"
    settings = SamplingSettings(k=3, generation=GenerationSettings(max_new_tokens=8), seed=1)
    pool = CandidatePool(expected=3)
    assert pool.total == 3 and not pool.finished
    CandidateGenerator(str(byte_gpt2_dir), prompts, out, pool, settings).run()  # synchronously
    assert pool.finished and pool.error is None
    items = pool.items()
    assert [i.prompt for i in items] == ["Review: The movie was", "<|user|>Hi<|assistant|>",  # chat rendered
                                         "Review: The movie was"]
    assert all(len(set(i.responses)) == 3 and all(r.strip() for r in i.responses) for i in items)
    assert items[0].id != items[2].id
    assert [r["id"] for r in read_log(out)] == [i.id for i in items]  # kept on disk as they came
    assert [i.id for i in read_candidates(out)] == [i.id for i in items]  # and usable as --candidates

    # A restart reuses the file: no model is loaded, the same items come back.
    monkeypatch.setattr("rlhf_lightning.models.load_causal_lm", lambda *a: pytest.fail("sampled again"))
    again = CandidatePool(expected=3)
    CandidateGenerator(str(byte_gpt2_dir), prompts, out, again, settings).run()
    assert again.items() == items and again.error is None


def test_a_response_repeated_within_one_draw_is_one_candidate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    draws = {"A": [["x", "x", " "], ["x", "y", "y"], ["z", "z", "x"]],  # distinct x, y, z after three draws
             "B": [["same"] * 3] * 4}  # never two distinct responses, in any of the 1 + max_tries draws
    monkeypatch.setattr("rlhf_lightning.models.load_tokenizer", lambda policy: None)
    monkeypatch.setattr("rlhf_lightning.models.load_causal_lm", lambda policy, tokenizer: None)
    monkeypatch.setattr("rlhf_lightning.generation.sample_texts",
                        lambda model, tokenizer, prompts, seed, **settings: draws[prompts[0]].pop(0))
    pool = CandidatePool(expected=2)
    CandidateGenerator("policy", [{"prompt": "A"}, {"prompt": "B"}], tmp_path / "c.jsonl", pool,
                       SamplingSettings(k=3)).run()
    assert pool.error is None and draws == {"A": [], "B": []}
    assert [item.responses for item in pool.items()] == [("x", "y", "z")]  # B is left out, not shown as twins
    assert pool.total == 1


def test_generator_failure_is_reported_in_the_pool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "model"
    empty.mkdir()
    pool = CandidatePool(expected=1)
    CandidateGenerator(str(empty), [{"prompt": "P"}], tmp_path / "c.jsonl", pool, SamplingSettings()).run()
    assert pool.finished and "has no tokenizer files" in pool.error
    assert candidates_module.read_log(tmp_path / "c.jsonl") == []
