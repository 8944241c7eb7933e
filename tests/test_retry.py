"""Store calls that fail transiently are retried, bounded by one process-wide outage clock (tracking.with_retry)."""

from __future__ import annotations

from http.client import RemoteDisconnected

import pytest
import requests
import urllib3
from mlflow.exceptions import MlflowException

from scaling import tracking
from scaling.config import ConfigError


def wrapped(*chain: BaseException) -> MlflowException:
    """How MLflow's REST client reports a failed request: its exception, the network errors as causes."""
    e = MlflowException(f"API request failed with exception {chain[0]}")
    for outer, inner in zip((e, *chain), chain):
        outer.__context__ = inner
    return e


def refused() -> tuple:
    return (requests.exceptions.ConnectionError("Max retries exceeded"),
            urllib3.exceptions.NewConnectionError(None, "Failed to establish a new connection"),
            ConnectionRefusedError(111, "Connection refused"))


def reset() -> tuple:
    return (requests.exceptions.ConnectionError("Connection aborted"), RemoteDisconnected("closed"))


class Flaky:
    """Fails with ``errors`` in turn, then answers."""

    def __init__(self, *errors):
        self.errors, self.calls = list(errors), 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return ("ok", args, kwargs)


@pytest.fixture(autouse=True)
def quick(monkeypatch):
    monkeypatch.setattr(tracking, "FIRST_WAIT_S", 0.01)
    monkeypatch.setattr(tracking.time, "sleep", lambda s: None)
    tracking.OUTAGE.ended()
    yield
    tracking.OUTAGE.ended()


def test_failures_are_told_apart():
    assert tracking.failure_kind(wrapped(*refused())) == "unsent"
    assert tracking.failure_kind(wrapped(requests.exceptions.ConnectTimeout("connect timed out"))) == "unsent"
    assert tracking.failure_kind(wrapped(*reset())) == "maybe"
    assert tracking.failure_kind(wrapped(requests.exceptions.ReadTimeout())) == "maybe"
    assert tracking.failure_kind(MlflowException("API request failed with error code 503 != 200")) == "maybe"
    assert tracking.failure_kind(Exception("(sqlite3.OperationalError) database is locked")) == "locked"
    assert tracking.failure_kind(MlflowException("Run 'x' not found")) == "fatal"
    assert tracking.failure_kind(MlflowException("API request failed with error code 500 != 200")) == "fatal"


def test_an_unreachable_store_is_waited_for_and_the_call_goes_through():
    fn = Flaky(wrapped(*refused()), wrapped(*refused()), wrapped(*reset()))
    assert tracking.with_retry(fn, 1, k=2) == ("ok", (1,), {"k": 2}) and fn.calls == 4
    assert tracking.OUTAGE.since is None  # an answer ends the outage


def test_a_request_that_may_have_been_applied_is_resent_only_when_idempotent():
    fn = Flaky(wrapped(*reset()))
    with pytest.raises(MlflowException):
        tracking.with_retry(fn, idempotent=False)
    assert fn.calls == 1
    fn = Flaky(wrapped(*refused()))  # never sent: safe to send even when not idempotent
    assert tracking.with_retry(fn, idempotent=False)[0] == "ok"


def test_other_errors_are_not_retried_and_locks_only_so_often():
    fn = Flaky(MlflowException("RESOURCE_DOES_NOT_EXIST"))
    with pytest.raises(MlflowException):
        tracking.with_retry(fn)
    assert fn.calls == 1
    fn = Flaky(*[Exception("database is locked")] * 3)
    with pytest.raises(Exception, match="locked"):
        tracking.with_retry(fn, attempts=3)
    assert fn.calls == 3


def test_past_the_limit_every_call_gives_up_at_once(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(tracking.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(tracking.time, "sleep", lambda s: clock.__setitem__(0, clock[0] + s))
    monkeypatch.setenv(tracking.RETRY_LIMIT_ENV, "30")
    down = Flaky(*[wrapped(*refused()) for _ in range(1000)])
    with pytest.raises(tracking.StoreUnavailable, match="has not answered for 30 s") as e:
        tracking.with_retry(down)
    assert e.value.exit_code == 3 and "\n" not in str(e.value)
    assert 4 < down.calls < 20  # backoff: waits that double, up to MAX_WAIT_S
    other = Flaky(wrapped(*refused()))  # another call (another thread) in the same outage: no second wait
    with pytest.raises(tracking.StoreUnavailable):
        tracking.with_retry(other)
    assert other.calls == 1


def test_a_bad_limit_is_a_config_error(monkeypatch, tmp_path):
    monkeypatch.setenv(tracking.RETRY_LIMIT_ENV, "soon")
    with pytest.raises(ConfigError, match="SCALING_STORE_RETRY_S must be a number"):
        tracking.connect(f"sqlite:///{tmp_path / 'mlflow.db'}")


def test_the_retrying_client_retries_every_method_but_resends_create_run_only_unsent():
    class Raw:
        tracking_uri = "http://nowhere"

        def __init__(self):
            self.get_run = Flaky(wrapped(*reset()))
            self.create_run = Flaky(wrapped(*reset()))

    client = tracking.RetryingClient(Raw())
    assert client.tracking_uri == "http://nowhere"
    assert client.get_run("r")[0] == "ok"
    with pytest.raises(MlflowException):
        client.create_run("0")
    assert tracking.with_retry(client.get_run, "r")[0] == "ok"  # no retry loop inside a retry loop


def test_log_record_packs_each_request_within_mlflows_limits():
    sent = []

    class Client:
        def log_batch(self, run_id, metrics=(), params=(), tags=()):
            sent.append((len(metrics), len(params), len(tags)))

    tracking.log_record(Client(), "r", params={f"p{i}": i for i in range(250)},
                        metrics=[(f"m{i}", 1.0, 0) for i in range(2500)], tags={f"t{i}": i for i in range(120)})
    assert sum(m for m, _, _ in sent) == 2500 and sum(p for _, p, _ in sent) == 250
    assert sum(t for _, _, t in sent) == 120
    assert all(m <= 1000 and p <= 100 and t <= 100 and m + p + t <= 1000 for m, p, t in sent)
    assert len(sent) == 3  # 100 params + 100 tags + 800 metrics, then 100 + 20 + 880, then 50 + 820


def test_a_server_is_searched_in_pages_each_well_inside_the_request_timeout():
    class Page(list):
        token = None

    class Client:
        def __init__(self, uri):
            self.tracking_uri, self.asked = uri, []

        def search_runs(self, ids, filter_string="", max_results=0, page_token=None):
            self.asked.append(max_results)
            page = Page(range(max_results))
            page.token = None if len(self.asked) == 3 else str(len(self.asked))
            return page

    server, local = Client("http://mlflow:5000"), Client("sqlite:///m.db")
    assert len(tracking.search_runs(server, ["1"])) == 3 * tracking.SERVER_PAGE
    assert server.asked == [tracking.SERVER_PAGE] * 3 and tracking.SERVER_PAGE <= 1000
    tracking.search_runs(local, ["1"])
    assert local.asked[0] == 10_000
