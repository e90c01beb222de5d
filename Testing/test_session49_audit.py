"""Session 49's mutation audit: behaviour of the code added this session that no other test pinned (each test names
the change it would catch)."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import SimpleITK as sitk

from DeepWMLLib import io

from conftest import in_folder, make_volume, write_dicom_series


def _series(tmp_path, uid):
    image, _ = make_volume(size=(8, 8, 4), spacing=(1.0, 1.0, 5.0), dtype=sitk.sitkInt16)
    return write_dicom_series(tmp_path / "s", image, uid=uid, description="AX FLAIR", number=1)


def test_the_racy_clock_is_the_wall_clock_in_ns(monkeypatch):
    """io._now_ns (stood in for by conftest's clock an hour on in every other test) is time.time_ns(), the clock
    files are stamped by: not a monotonic clock (its own epoch: no folder would ever be kept), nor one behind."""
    monkeypatch.undo()  # conftest's folders_written_long_ago
    before = time.time_ns()
    now = io._now_ns()
    assert before <= now <= time.time_ns()


def test_a_folder_written_2_5_s_before_its_reading_is_read_again(tmp_path, header_reads, monkeypatch):
    """The racy bound is 3 s (FAT's 2 s step and a tick and a server's clock): files changed 2.5 s before the reading
    are not kept (read again when asked for again)."""
    folder = _series(tmp_path, "1.2.3.91")
    changed = max(max(p.stat().st_mtime_ns, p.stat().st_ctime_ns) for p in folder.iterdir())
    monkeypatch.setattr(io, "_now_ns", lambda: changed + 2_500_000_000)
    with io.dicom_headers_read_once():
        assert io.dicom_series(folder) == io.dicom_series(folder)
        assert io._header_cache == {}
    assert in_folder(header_reads, folder) == {2: 4}


@pytest.mark.parametrize("which", [0, -1])
def test_one_file_changed_near_the_reading_keeps_its_folder_from_being_kept(tmp_path, header_reads, monkeypatch,
                                                                            which):
    """Every file of the folder is judged, the first by name as much as the last: one whose modification time is
    ahead of the reading (the others' long before it) has the folder read again."""
    folder = _series(tmp_path, "1.2.3.92")
    changed = max(p.stat().st_ctime_ns for p in folder.iterdir())
    monkeypatch.setattr(io, "_now_ns", lambda: changed + 600 * 10**9)
    old = changed - 3600 * 10**9
    files = sorted(folder.iterdir())
    for p in files:
        os.utime(p, ns=(old, old))
    ahead = changed + 7200 * 10**9
    os.utime(files[which], ns=(ahead, ahead))
    with io.dicom_headers_read_once():
        assert io.dicom_series(folder) == io.dicom_series(folder)
        assert io._header_cache == {}
    assert in_folder(header_reads, folder) == {2: 4}


# train: the resume notes and the broken-weights refusal, on their own (no run needed)

def _cfg(**kw):
    from types import SimpleNamespace

    return SimpleNamespace(**{"epochs": 5, "batch_size": 4, **kw})


@pytest.mark.parametrize("state, world, said", [
    ({"world_size": 1, "finished": False, "epoch": 2}, 2, True),
    ({"world_size": 2, "finished": False, "epoch": 2}, 2, False),  # the same processes
    ({"world_size": None, "finished": False, "epoch": 2}, 2, False),  # a version that kept none
    ({"finished": False, "epoch": 2}, 2, False),
    ({"world_size": 1, "finished": True, "epoch": 2}, 2, False),  # stopped early: nothing trains on
    ({"world_size": 1, "finished": False, "epoch": 5}, 2, False),  # all its epochs done
])
def test_another_number_of_processes_is_said_only_where_the_run_trains_on(caplog, state, world, said):
    from DeepWMLLib import train

    with caplog.at_level("WARNING", logger="DeepWMLLib"):
        train._warn_other_world_size(state, world, _cfg(), "member 1: ")
    assert ("trained in 1 process(es) and resumes in 2" in caplog.text) == said
    if said:
        assert "member 1: " in caplog.text and "a step now takes 8 slices instead of 4" in caplog.text


@pytest.mark.parametrize("state, device, said", [
    ({"threads": 1, "finished": False, "epoch": 2}, "cpu", True),
    ({"threads": 1, "finished": False, "epoch": 2}, "cuda", False),  # a GPU run: threads do not matter
    ({"threads": None, "finished": False, "epoch": 2}, "cpu", False),  # a GPU run's state, or an old version's
    ({"threads": 1, "finished": True, "epoch": 2}, "cpu", False),
    ({"threads": 1, "finished": False, "epoch": 5}, "cpu", False),
])
def test_other_threads_are_said_only_for_a_cpu_run_that_trains_on(caplog, monkeypatch, state, device, said):
    from types import SimpleNamespace

    import torch

    from DeepWMLLib import train

    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    with caplog.at_level("INFO", logger="DeepWMLLib"):
        train._say_other_threads(state, SimpleNamespace(type=device), _cfg())
    assert ("trained on 1 CPU thread(s) and resumes on 3" in caplog.text) == said


def test_broken_weights_of_a_first_epoch_name_no_kept_epoch_nor_best_pt(tmp_path):
    """Weights gone infinite (not NaN) in the first epoch: refused; nothing was kept, so no last.pt epoch nor best.pt
    is offered. Finite weights pass, whatever an integer buffer holds."""
    import torch

    from DeepWMLLib import train
    from DeepWMLLib.errors import DeepWMLError

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    train._refuse_broken_weights(model, 1, 0.5, tmp_path, 0)  # healthy: nothing said
    with torch.no_grad():
        model[0].weight[0, 0] = float("inf")
    with pytest.raises(DeepWMLError) as refused:
        train._refuse_broken_weights(model, 1, 0.5, tmp_path, 0)
    said = str(refused.value)
    assert "weights became NaN or infinite in epoch 1 (train loss 0.5)" in said and "no epoch was kept" in said
    assert "last.pt keeps" not in said and "--init" not in said
    with pytest.raises(DeepWMLError, match=r"last.pt keeps epoch 3.*--init .*best.pt starts from the best epoch"):
        train._refuse_broken_weights(model, 4, 0.5, tmp_path, 3)


# dicom_outline: which images are DeepWML's, and what a replacement keeps

@pytest.fixture
def outline_folder(tmp_path):
    """(a FLAIR's DICOM folder, an outline series DeepWML wrote of it)."""
    from test_dicom_outline import _outline, oblique_flair

    folder, truth = oblique_flair(tmp_path)
    _outline(folder, truth, tmp_path / "own")
    return folder, tmp_path / "own"


@pytest.mark.parametrize("ours, theirs", [
    (b"DeepWML", b"OtherCo"),  # another tool's Secondary Capture
    (b"1.2.840.10008.5.1.4.1.1.7\0", b"1.2.840.10008.5.1.4.1.1.4\0"),  # DeepWML named, but an MR image's SOP Class
])
def test_an_image_of_another_maker_or_class_is_not_deepwmls(outline_folder, ours, theirs):
    """An outline image whose Secondary Capture Device Manufacturer is not DeepWML, or whose SOP Class is not
    Secondary Capture, is not DeepWML's: refused, and never removed with the series."""
    from DeepWMLLib import dicom_outline
    from DeepWMLLib.errors import DeepWMLError

    _, own = outline_folder
    first = own / "IM00001.dcm"
    data = first.read_bytes()
    assert ours in data
    first.write_bytes(data.replace(ours, theirs))
    assert not dicom_outline.is_outline_image(first)
    assert dicom_outline.foreign_images(own) == [first]
    with pytest.raises(DeepWMLError, match=r"\(1: IM00001.dcm;"):
        dicom_outline.check_outline_folder(own, True)
    dicom_outline.remove_outline_series(own)
    assert [p.name for p in own.iterdir()] == ["IM00001.dcm"]


def test_a_link_named_as_an_outline_image_is_not_deepwmls(outline_folder, tmp_path):
    """A symbolic link under an image's name, even to an image DeepWML wrote, is not DeepWML's own file: the folder
    is refused, and a removal leaves the link."""
    from DeepWMLLib import dicom_outline
    from DeepWMLLib.errors import DeepWMLError

    _, own = outline_folder
    other = tmp_path / "other"
    other.mkdir()
    (own / "IM00001.dcm").rename(other / "IM00001.dcm")
    link = own / "IM00001.dcm"
    try:
        link.symlink_to(other / "IM00001.dcm")
    except OSError:
        pytest.skip("no symbolic links here")
    assert dicom_outline.is_outline_image(other / "IM00001.dcm") and not dicom_outline.is_outline_image(link)
    with pytest.raises(DeepWMLError, match="not DeepWML's outline series"):
        dicom_outline.check_outline_folder(own, True)
    dicom_outline.remove_outline_series(own)
    assert [p.name for p in own.iterdir()] == ["IM00001.dcm"] and link.is_symlink()


def test_a_linked_outline_folder_is_not_looked_into(outline_folder, tmp_path):
    """refuse_foreign_images does not look into a folder that is a symbolic link (its link alone is removed), nor
    into one that is not there."""
    from DeepWMLLib import dicom_outline
    from conftest import users_images_in

    flair, _ = outline_folder
    theirs = tmp_path / "theirs"
    users_images_in(flair, theirs)
    link = tmp_path / "link"
    try:
        link.symlink_to(theirs, target_is_directory=True)
    except OSError:
        pytest.skip("no symbolic links here")
    dicom_outline.refuse_foreign_images(link)
    dicom_outline.refuse_foreign_images(tmp_path / "missing")


@pytest.mark.parametrize("count, shown", [
    (3, "(3: IM00001.dcm, IM00002.dcm, IM00003.dcm;"),
    (4, "(4: IM00001.dcm, IM00002.dcm, IM00003.dcm, ...;"),
])
def test_the_refusal_names_three_foreign_images_then_says_there_are_more(outline_folder, tmp_path, count, shown):
    from DeepWMLLib import dicom_outline
    from DeepWMLLib.errors import DeepWMLError
    from conftest import users_images_in

    flair, _ = outline_folder
    theirs = tmp_path / "theirs"
    users_images_in(flair, theirs)
    for extra in sorted(theirs.iterdir())[count:]:
        extra.unlink()
    with pytest.raises(DeepWMLError) as refused:
        dicom_outline.refuse_foreign_images(theirs)
    assert shown in str(refused.value)


def test_a_file_put_in_aside_goes_to_the_next_free_kept_name(tmp_path):
    """_remove_replaced: a file left in the series moved aside whose name and first kept name are both taken in the
    new folder goes under the second (.kept2), never over either."""
    from DeepWMLLib import dicom_outline

    old, folder = tmp_path / ".old", tmp_path / "series"
    (old / "series").mkdir(parents=True)
    folder.mkdir()
    (old / "series" / "notes.txt").write_text("mine")
    (folder / "notes.txt").write_text("new 1")
    (folder / "notes.kept1.txt").write_text("new 2")

    class Bounded(type(folder)):  # a name looked for endlessly (one kept name tried again and again) stops the test
        tried = [0]

        def __truediv__(self, key):
            self.tried[0] += 1
            if self.tried[0] > 50:
                raise RuntimeError("the same kept name is tried again and again")
            return super().__truediv__(key)

    dicom_outline._remove_replaced(old, Bounded(folder))
    assert {p.name: p.read_text() for p in folder.iterdir()} == {"notes.txt": "new 1", "notes.kept1.txt": "new 2",
                                                                 "notes.kept2.txt": "mine"}
    assert not old.exists()


def test_a_file_that_cannot_be_moved_back_is_left_aside_never_deleted(tmp_path, monkeypatch, caplog):
    """_remove_replaced: a file put in the folder that cannot be moved into the new series' folder is left where it
    is (the folder moved aside), said, never deleted with it."""
    from DeepWMLLib import dicom_outline

    old, folder = tmp_path / ".old", tmp_path / "series"
    (old / "series").mkdir(parents=True)
    folder.mkdir()
    (old / "series" / "notes.txt").write_text("mine")

    def refused(source, target):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(dicom_outline.io, "_replace", refused)
    with caplog.at_level("WARNING"):
        dicom_outline._remove_replaced(old, folder)
    assert (old / "series" / "notes.txt").read_text() == "mine"
    assert "could not be moved back into it (Permission denied)" in caplog.text


def test_only_images_named_as_the_series_are_judged(outline_folder):
    """foreign_images judges the files named as the series' images (IM*.dcm) alone: a user's DICOM file under
    another name in an earlier series' folder is not refused (a removal leaves it, with the folder)."""
    from DeepWMLLib import dicom_outline

    flair, own = outline_folder
    (own / "scan.dcm").write_bytes(sorted(flair.iterdir())[0].read_bytes())
    assert dicom_outline.foreign_images(own) == []
    dicom_outline.refuse_foreign_images(own)
    dicom_outline.remove_outline_series(own)
    assert [p.name for p in own.iterdir()] == ["scan.dcm"]


@pytest.mark.parametrize("what, scan", [
    ("the FLAIR", True), ("its FLAIR PATH", True), ("FLAIR PATH", True), ("the baseline FLAIR", True),
    ("the follow-up FLAIR", True), ("FLAIR_manual.nii.gz", False), ("FLAIRS", False),
    ("reference sub01_FLAIR_manual.nii.gz", False), ("rater B's mask FLAIR", False),
])
def test_a_name_is_the_scan_only_by_the_callers_own_words(what, scan):
    """io._names_a_scan: "FLAIR" as a whole word, at the start (after "the"/"its", "baseline"/"follow-up"): a file
    name that begins with FLAIR_ or a word that begins with FLAIR is not the scan."""
    assert io._names_a_scan(what) is scan


@pytest.mark.parametrize("flipped", [0, 1])
def test_a_prediction_or_reference_stored_top_down_is_noted_by_its_name(flipped):
    """MaskPair.from_images (deepwml evaluate), as binary_pair (consensus): compared on the reference's grid, as it is
    stored, the prediction stored with its slices the other way from it (either one flipped) is named in a note
    mapping the grid's slices to its own."""
    from DeepWMLLib.metrics import MaskPair
    from test_consensus import image, raters

    a, b = raters()
    masks = [image(a), image(b)]
    masks[flipped] = sitk.Flip(masks[flipped], [False, False, True])
    names = ("prediction p.nii.gz", "reference r.nii.gz")
    notes = [n for n in MaskPair.from_images(*masks, names=names).grid_notes() if "another order" in n]
    assert len(notes) == 1 and notes[0].startswith(f"{names[0]} stores its slices in another order")
    assert notes[0].endswith(f"slices 0 to 7 shown are {names[0]}'s own slices 7 to 0")


def test_an_ensemble_whose_members_all_started_resumes_without_its_init_file(tmp_path):
    """Every member of an ensemble has its weights in its last.pt: --init's file is not needed, so a resume goes on
    without it (moved or deleted since), as a single run's does; each member's folder is what tells, not the run's."""
    from DeepWMLLib import train as training
    from test_train import make_dataset, read_history, tiny_config

    dataset = make_dataset(tmp_path / "data")
    source = training.train(tiny_config(dataset, epochs=1, samples_per_epoch=8), tmp_path / "source")
    config = tiny_config(dataset, epochs=1, samples_per_epoch=8, init=str(source), ensemble=2)
    run = tmp_path / "tuned"
    training.train(config, run)
    Path(source).unlink()
    training.train(dict(config, epochs=2), run)
    assert [int(r["epoch"]) for r in read_history(run / "model_1")] == [1, 2]


def test_a_started_run_trained_on_a_non_flair_keeps_it_when_its_cache_is_prepared_again(tmp_path, monkeypatch):
    """A run started with --allow-non-flair, resumed without it after a file of its cache was deleted: prepared again
    with the decision it started with (config.json), so the case it trained on is trained on again, not refused."""
    from conftest import oracle_network
    from DeepWMLLib import train as training
    from test_train import _contrast_config, make_contrast_cohort, read_history

    oracle_network(monkeypatch)
    manifest = make_contrast_cohort(tmp_path / "data", "T1-weighted")
    run = tmp_path / "run"
    training.train(_contrast_config(manifest, tmp_path, allow_non_flair=True), run)
    (run / "cache" / "train_images.npy").unlink()
    training.train(_contrast_config(manifest, tmp_path, epochs=2), run)
    assert [int(r["epoch"]) for r in read_history(run)] == [1, 2]
    assert "c4" in __import__("json").loads((run / "cache" / "train.json").read_text(encoding="utf-8"))["cases"]


def test_the_reading_begins_before_its_folder_is_looked_at(tmp_path, header_reads, monkeypatch):
    """The moment files' times are judged against is taken before the folder's state (a listing of a large folder,
    or a slow share, takes seconds): files changed 1 s before the reading began are not kept, even where the clock
    has moved on 10 s by the time the listing ends (a reading then would keep them)."""
    folder = _series(tmp_path, "1.2.3.93")
    changed = max(max(p.stat().st_mtime_ns, p.stat().st_ctime_ns) for p in folder.iterdir())
    clock = [changed + 10**9]
    monkeypatch.setattr(io, "_now_ns", lambda: clock[0])
    state = io._folder_state

    def slow(root, recursive):
        found = state(root, recursive)
        clock[0] += 10 * 10**9
        return found

    monkeypatch.setattr(io, "_folder_state", slow)
    with io.dicom_headers_read_once():  # the second reading begins 10 s on: its answer is kept, the first's was not
        assert io.dicom_series(folder) == io.dicom_series(folder)
    assert in_folder(header_reads, folder) == {2: 4}
