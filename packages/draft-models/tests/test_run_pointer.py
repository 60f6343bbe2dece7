"""The last-run record that lets the commands after `trainer:train` run without a path."""

from pathlib import Path

from torchspec.draft_models.run_pointer import DEFAULT_RUN, last_run, record_last_run, serving_folder


def test_without_a_record_the_default_run_is_used(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert last_run() == Path("outputs/default_llama") == DEFAULT_RUN
    assert serving_folder(last_run()) == Path("outputs/default_llama_hf")


def test_the_recorded_run_is_returned_relative_to_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    record_last_run("outputs/default_mla")
    assert (tmp_path / "outputs" / ".last_run").read_text().strip() == str(tmp_path / "outputs" / "default_mla")
    assert last_run() == Path("outputs/default_mla")
    assert serving_folder(last_run()) == Path("outputs/default_mla_hf")
    assert not list((tmp_path / "outputs").glob(".last_run.*"))  # written atomically, no staging left


def test_a_run_outside_the_working_directory_stays_absolute(tmp_path, monkeypatch):
    elsewhere = tmp_path / "runs" / "big_run"
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    record_last_run(elsewhere)
    assert last_run() == elsewhere
    assert serving_folder(elsewhere) == tmp_path / "runs" / "big_run_hf"
