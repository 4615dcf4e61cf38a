"""Multipart uploads on /predictions (`curl -F "data=@digit.png"`) answer as the raw body, and
are bounded like it; `--replicas MIN-MAX` becomes Serve's autoscaling_config, and bad forms of it
exit 2 with one line before Ray starts."""

from __future__ import annotations

import pytest


def raw_answer(local, data: bytes) -> dict:
    return local.client.post("/predictions/digits", content=data, headers={"Content-Type": "image/png"}).json()


def test_form_field_data_answers_as_the_raw_body(local):
    r = local.client.post("/predictions/digits", files={"data": ("digit.png", local.pngs[0], "image/png")})
    assert r.status_code == 200 and r.json() == raw_answer(local, local.pngs[0])


def test_field_data_wins_else_the_first_file(local):
    c = local.client
    r = c.post("/predictions/digits", files=[("other", ("a.png", local.pngs[1], "image/png")),
                                             ("data", ("b.png", local.pngs[2], "image/png"))])
    assert r.json() == raw_answer(local, local.pngs[2])
    r = c.post("/predictions/digits", data={"note": "hello"}, files={"upload": ("c.png", local.pngs[3], "image/png")})
    assert r.json() == raw_answer(local, local.pngs[3])
    r = c.put("/predictions/digits", files={"data": ("d.png", local.pngs[0], "application/octet-stream")})
    assert r.json() == raw_answer(local, local.pngs[0])


@pytest.mark.parametrize("body,content_type,status,says", [
    (b"--x\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nhi\r\n--x--\r\n", "multipart/form-data; boundary=x",
     400, "without a file"),
    (b"--x\r\n\r\n--x--\r\n", "multipart/form-data", 400, "without a boundary"),
    (b"".join(b"--x\r\nContent-Disposition: form-data; name=\"f%d\"\r\n\r\nv\r\n" % i for i in range(40)) + b"--x--\r\n",
     "multipart/form-data; boundary=x", 400, "over 16 parts"),
    (b"--x\r\nContent-Disposition: form-data; name=\"data\"; filename=\"a\"\r\n" + b"X-Pad: " + b"a" * 10_000
     + b"\r\n\r\nv\r\n--x--\r\n", "multipart/form-data; boundary=x", 400, "eader"),
    (b"--x\r\nContent-Disposition: form-data; name=\"data\"; filename=\"a\"\r\n\r\n\r\n--x--\r\n",
     "multipart/form-data; boundary=x", 400, "empty"),
    (b"--x\r\nContent-Disposition: form-data; name=\"data\"; filename=\"a\"\r\n\r\nnot an image\r\n--x--\r\n",
     "multipart/form-data; boundary=x", 400, ""),
    (b"garbage", "multipart/form-data; boundary=x", 400, "multipart"),
])
def test_bad_forms_are_refused(local, body, content_type, status, says):
    r = local.client.post("/predictions/digits", content=body, headers={"Content-Type": content_type})
    assert r.status_code == status, r.text
    assert says in r.json()["error"]


def test_oversized_form_is_refused_as_an_oversized_body(local):
    big = b"\0" * (300 * 1024)  # over max_body_bytes (256 KiB), whatever its framing
    r = local.client.post("/predictions/digits", files={"data": ("big.png", big, "image/png")})
    assert r.status_code == 413 and "over the limit" in r.json()["error"]


# --- --replicas MIN-MAX -------------------------------------------------------------------------
def parse(argv: list[str]):
    from cnnray.cli import build_parser

    return build_parser().parse_args(["serve", "--checkpoint", "ck", "--name", "x", *argv])


def test_replicas_range_becomes_autoscaling_and_a_number_stays_fixed():
    from cnnray.serve.autoscale import TARGET_ONGOING_REQUESTS, autoscaling_config
    from cnnray.cli.serve import serve_args_from

    args = serve_args_from(parse(["--replicas", "1-3", "--upscale-delay-s", "1", "--downscale-delay-s", "2"]))
    assert args.autoscaling is not None and args.replicas == "auto"
    assert autoscaling_config(args.autoscaling) == {
        "min_replicas": 1, "initial_replicas": 1, "max_replicas": 3, "target_ongoing_requests": TARGET_ONGOING_REQUESTS,
        "upscale_delay_s": 1.0, "downscale_delay_s": 2.0, "look_back_period_s": args.autoscaling.look_back_period_s,
    }
    fixed = serve_args_from(parse(["--replicas", "2"]))
    assert fixed.replicas == 2 and fixed.autoscaling is None


@pytest.mark.parametrize("argv,says", [
    (["--replicas", "2-1"], "need 1 <= MIN <= MAX"),
    (["--replicas", "0-2"], "need 1 <= MIN <= MAX"),
    (["--replicas", "1-"], "is not MIN-MAX"),
    (["--replicas", "a-b"], "is not MIN-MAX"),
    (["--replicas", "1-2-3"], "is not MIN-MAX"),
    (["--replicas", "1-5000"], "need 1 <= MIN <= MAX"),
])
def test_bad_replica_ranges_exit_2_with_one_line(argv, says, capsys):
    with pytest.raises(SystemExit) as e:
        parse(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and says in err and err.count("\n") == 1, err


def test_scale_delays_need_a_range(tmp_path, capsys):
    from cnnray.cli import main

    assert main(["serve", "--checkpoint", str(tmp_path), "--name", "x", "--replicas", "2",
                 "--upscale-delay-s", "1"]) == 2
    err = capsys.readouterr().err
    assert "go with --replicas MIN-MAX" in err and err.count("\n") == 1


def test_grpc_port_goes_into_the_serve_config():
    from cnnray.serve.runner import serve_config
    from cnnray.serve.schemas import ServeArgs

    config = serve_config(ServeArgs(checkpoints={"x": "/ck"}), grpc_port=9001)
    assert config["grpc_options"] == {
        "port": 9001, "grpc_servicer_functions": ["cnnray.serve.oip_grpc.add_GRPCInferenceServiceServicer_to_server"],
        "enable_reflection": False,
    }
    assert "grpc_options" not in serve_config(ServeArgs(checkpoints={"x": "/ck"}))


def test_build_app_gives_serve_the_autoscaling_config(tmp_path):
    from cnnray.serve.app import build_app
    from cnnray.serve.schemas import ServeArgs
    from tests.helpers.serve import MNIST_INFO, save_model

    ck = save_model(tmp_path / "ck", "cnn", MNIST_INFO)
    scaled = build_app(ServeArgs(checkpoints={"x": str(ck)}, autoscaling={"min_replicas": 1, "max_replicas": 2}))
    config = scaled._bound_deployment._deployment_config
    assert config.autoscaling_config.min_replicas == 1 and config.autoscaling_config.max_replicas == 2
    fixed = build_app(ServeArgs(checkpoints={"x": str(ck)}, replicas=2))._bound_deployment._deployment_config
    assert fixed.autoscaling_config is None and fixed.num_replicas == 2


def test_grpc_port_must_differ_from_the_http_port(tmp_path, capsys):
    from cnnray.cli import main
    from tests.helpers.processes import free_port
    from tests.helpers.serve import MNIST_INFO, save_model

    ck = save_model(tmp_path / "ck", "cnn", MNIST_INFO)
    port = free_port()
    assert main(["serve", "--checkpoint", str(ck), "--name", "x", "--replicas", "1", "--port", str(port),
                 "--grpc-port", str(port)]) == 2
    assert "is also --port" in capsys.readouterr().err


def test_a_range_whose_max_does_not_fit_this_machine_exits_2(tmp_path, capsys):
    from cnnray.cli import main
    from tests.helpers.serve import MNIST_INFO, save_model

    ck = save_model(tmp_path / "ck", "cnn", MNIST_INFO)
    assert main(["serve", "--checkpoint", str(ck), "--name", "x", "--replicas", "1-4096"]) == 2
    assert "--replicas 4096 need 4096 CPUs" in capsys.readouterr().err
