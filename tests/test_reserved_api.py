import pytest
from rush_hpc import TaskError


@pytest.mark.parametrize("name", ["state", "keys", "worker_id", "pid"])
def test_reserved_names_are_refused_by_the_task_api(rush, worker, name):
    with pytest.raises(TaskError, match=rf"xss\[0\] uses the reserved column name\(s\) '{name}'"):
        rush.push_tasks([{name: 1}])
    with pytest.raises(TaskError, match="xss"):
        worker.push_running_tasks([{"x": 1, name: 1}])
    key = worker.push_running_tasks([{"x": 1}])
    with pytest.raises(TaskError, match="yss"):
        worker.push_results(key, [{name: 2}])
    with pytest.raises(TaskError, match="conditions"):
        worker.push_failed(key, conditions=[{name: 3}])
    assert rush.n_tasks == 1 and rush.task_states(key) == {key[0]: "running"}  # nothing was written


def test_extras_may_set_pid_but_not_the_other_reserved_names(rush, worker):
    key = worker.push_running_tasks([{"x": 1}], extra=[{"pid": 7}])
    worker.push_results(key, [{"y": 2}])
    assert rush.fetch_finished_tasks()["pid"].tolist() == [7]
    with pytest.raises(TaskError, match="extra"):
        rush.push_tasks([{"x": 1}], extra={"state": "mine"})
