"""The test suite's own grouping (Testing/conftest.py): the controller's scheduler names each test's unit from the
group files the workers wrote, a test sharing its module's fixture is grouped by module, and a pytest-xdist without
the private method the scheduler overrides runs the tests ungrouped, with a warning, instead of failing the run."""
import json
from types import SimpleNamespace

import pytest

import conftest

scheduler_module = pytest.importorskip("xdist.scheduler")


def _config(dist="loadgroup"):
    options = {"dist": dist, "tx": ["2*popen"], "numprocesses": 2}
    return SimpleNamespace(getoption=lambda name, default=None: options.get(name, default),
                           getvalue=lambda name: options[name])


def test_the_scheduler_names_each_tests_unit_by_the_groups_the_workers_wrote(tmp_path, monkeypatch):
    (tmp_path / "gw0.json").write_text(json.dumps({"Testing/test_a.py::t1": "phantom_pair"}), encoding="utf-8")
    (tmp_path / "gw1.json").write_text(json.dumps({"Testing/test_b.py::t2": "test_b",
                                                   "Testing/test_a.py::t3": "phantom_pair"}), encoding="utf-8")
    monkeypatch.setenv(conftest._GROUPS_FOLDER, str(tmp_path))
    scheduler = conftest.pytest_xdist_make_scheduler(_config(), None)
    assert isinstance(scheduler, scheduler_module.LoadScopeScheduling)
    assert scheduler._split_scope("Testing/test_a.py::t1") == scheduler._split_scope("Testing/test_a.py::t3")
    assert scheduler._split_scope("Testing/test_b.py::t2") == "test_b"
    # a test of no group is a unit of its own (not its module's, as xdist's loadscope would make it)
    assert scheduler._split_scope("Testing/test_a.py::t4") == "Testing/test_a.py::t4"


def test_other_distributions_and_a_run_without_the_group_folder_keep_xdists_scheduler(tmp_path, monkeypatch):
    monkeypatch.setenv(conftest._GROUPS_FOLDER, str(tmp_path))
    assert conftest.pytest_xdist_make_scheduler(_config("load"), None) is None
    monkeypatch.delenv(conftest._GROUPS_FOLDER)
    assert conftest.pytest_xdist_make_scheduler(_config(), None) is None


def test_a_pytest_xdist_without_split_scope_runs_the_tests_ungrouped_with_a_warning(tmp_path, monkeypatch):
    monkeypatch.setenv(conftest._GROUPS_FOLDER, str(tmp_path))
    monkeypatch.delattr(scheduler_module.LoadScopeScheduling, "_split_scope")
    with pytest.warns(UserWarning, match="not grouped"):
        assert conftest.pytest_xdist_make_scheduler(_config(), None) is None


@pytest.fixture(scope="module")
def _module_work():
    return object()


def test_a_test_sharing_its_modules_fixture_is_grouped_by_its_module(request, _module_work):
    assert conftest.shared_work_group(request.node) == __name__


def test_a_test_sharing_nothing_is_in_no_group(request):
    assert conftest.shared_work_group(request.node) is None
