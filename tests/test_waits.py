import io


class Terminal(io.StringIO):
    def isatty(self):
        return True


def loop(rush):
    while not rush.terminated:
        task = rush.pop_task(timeout=0.5)
        if task is not None:
            rush.push_results(task.key, [{"y": task.xs["x"]}])


def test_waits_draw_progress_when_forced(rush, monkeypatch, tmp_path):
    screen = Terminal()
    monkeypatch.setattr("sys.stderr", screen)
    ids = rush.start_local_workers(loop, n_workers=2, log_dir=str(tmp_path))
    rush.wait_for_workers(worker_ids=ids, timeout=60, progress=True)
    keys = rush.push_tasks([{"x": i} for i in range(20)])
    rush.wait_for_tasks(keys, timeout=60, progress=True)
    out = screen.getvalue()
    assert "workers" in out and "2/2" in out and "registered" in out
    assert "tasks" in out and "20/20" in out
    quiet = Terminal()
    monkeypatch.setattr("sys.stderr", quiet)
    rush.wait_for_tasks(keys, timeout=60)  # auto: off under pytest
    assert quiet.getvalue() == ""
