"""The CLI contract: --help everywhere, exit codes, one-line errors, jsonl events."""

import json

import pytest

from WeakLiverSegLib.app import cli

COMMANDS = ["phantom", "train", "pseudo", "segment", "evaluate", "demo", "bench"]


def test_help_everywhere(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    top = capsys.readouterr().out
    for command in COMMANDS:
        assert command in top
        with pytest.raises(SystemExit) as exc:
            cli.main([command, "--help"])
        assert exc.value.code == 0
        assert f"weakliverseg {command}" in capsys.readouterr().out


def test_contract_flags_present():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    expected = {
        "phantom": ["--out", "--cases", "--seed", "--shape", "--spacing", "--noise", "--tumors", "--plain-contrast",
                    "--enhanced-contrast", "--healthy-fraction", "--mix", "--preview"],
        "train": ["--dataset", "--recipe", "--out", "--init", "--resume", "--device", "--steps", "--progress"],
        "pseudo": ["--model", "--dataset", "--out"],
        "segment": ["--model", "--input", "--boxes", "--out", "--probabilities"],
        "evaluate": ["--pred", "--truth", "--labels", "--out"],
        "demo": ["--out", "--device"],
        "bench": ["--out"],
    }
    for command, flags in expected.items():
        have = {opt for action in sub[command]._actions for opt in action.option_strings}
        assert set(flags) <= have, (command, set(flags) - have)


def test_missing_dataset_is_exit_2_with_the_path(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    code = cli.main(["train", "--dataset", str(missing), "--recipe", "o2l", "--out", str(tmp_path / "m"),
                     "--progress", "none"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and str(missing) in err[0]


def test_unknown_recipe_is_exit_2(tmp_path, capsys):
    from WeakLiverSegLib.data.store import Dataset

    Dataset.create(tmp_path / "ds")
    code = cli.main(["train", "--dataset", str(tmp_path / "ds"), "--recipe", "nosuch", "--out", str(tmp_path / "m")])
    assert code == 2
    assert "unknown recipe 'nosuch'" in capsys.readouterr().err


def test_missing_model_folder_jsonl_error_event(tmp_path, capsys):
    code = cli.main(["segment", "--model", str(tmp_path / "nomodel"), "--input", str(tmp_path / "x.nii.gz"),
                     "--out", str(tmp_path / "y.nii.gz"), "--device", "cpu", "--progress", "jsonl"])
    captured = capsys.readouterr()
    assert code == 2
    events = [json.loads(line) for line in captured.out.splitlines()]
    assert events[-1]["event"] == "error" and "nomodel" in events[-1]["message"]


def test_cuda_requested_without_gpu_is_a_clear_error(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    from WeakLiverSegLib.data.store import Dataset

    Dataset.create(tmp_path / "ds")
    code = cli.main(["train", "--dataset", str(tmp_path / "ds"), "--recipe", "o2l", "--out", str(tmp_path / "m"),
                     "--device", "cuda", "--progress", "none"])
    assert code == 2
    assert "cuda" in capsys.readouterr().err.lower()


def test_parse_overrides_nested_and_typed():
    assert cli.parse_overrides(["student.lr=0.001", "teacher.attention=none", "steps=5"]) == {
        "student": {"lr": 0.001}, "teacher": {"attention": "none"}, "steps": 5}
    with pytest.raises(cli.InputError, match="KEY=VALUE"):
        cli.parse_overrides(["oops"])


def test_parse_inputs_single_and_phases(tmp_path):
    assert cli.parse_inputs(["a.nii.gz"]) == {None: cli.Path("a.nii.gz")}
    assert cli.parse_inputs(["enhanced=a.nii.gz", "plain=b.nii.gz"]) == {
        "enhanced": cli.Path("a.nii.gz"), "plain": cli.Path("b.nii.gz")}
    with pytest.raises(cli.InputError, match="twice"):
        cli.parse_inputs(["plain=a.nii.gz", "plain=b.nii.gz"])
