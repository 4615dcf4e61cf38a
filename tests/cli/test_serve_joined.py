"""`cnnray serve --address` on a cluster someone else uses: an application of cnnray's name
that is already there is another user's (or an earlier job's), and is left alone."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from cnnray.config import ConfigError


def test_an_app_of_our_name_on_a_joined_cluster_is_refused_not_replaced(monkeypatch):
    from ray import serve

    from cnnray.cli.serve import _check_app_name_free
    from cnnray.serve.defaults import APP_NAME

    monkeypatch.setattr(serve, "status", lambda: SimpleNamespace(applications={"theirs": object()}))
    _check_app_name_free()  # another name: ours to deploy beside it
    monkeypatch.setattr(serve, "status", lambda: SimpleNamespace(applications={APP_NAME: object()}))
    with pytest.raises(ConfigError, match=f"already serves an application named '{APP_NAME}'"):
        _check_app_name_free()
