"""`bertscale doctor`: the rank-0 handshake, version comparison, disk and environment checks."""

from __future__ import annotations

import threading
from pathlib import Path

from bertscale import doctor
from servers import free_port

from bertscale.config import load_config


def test_handshake_reaches_rank0_and_compares_versions(tmp_path):
    port = free_port()
    served: list = []
    t = threading.Thread(target=lambda: served.append(doctor.serve(port, peers=1, timeout=20)))
    t.start()
    cfg = load_config(overrides=[f"workdir={tmp_path}"])
    for _ in range(50):
        report = doctor.run_doctor(cfg, "127.0.0.1", port, timeout=2)
        if any(c.name == "master port" and c.status == "ok" for c in report.checks):
            break
    t.join(timeout=30)
    assert report.ok, report.render()
    assert {c.name for c in report.checks} >= {"versions", "checkpoint disk", "master port", "versions match rank 0"}
    assert served[0].ok and "1 of 1 peers" in served[0].render()


def test_unreachable_master_fails_with_advice(tmp_path):
    report = doctor.run_doctor(load_config(overrides=[f"workdir={tmp_path}"]), "127.0.0.1", free_port(), 1)
    assert not report.ok
    assert "doctor --serve" in report.render()


def test_environment_checks(tmp_path, monkeypatch):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "no-such-if0")
    monkeypatch.setenv("RANK", "4")
    monkeypatch.setenv("WORLD_SIZE", "2")
    report = doctor.run_doctor(load_config(overrides=[f"workdir={tmp_path}"]), "no-such-host.invalid", 1, 0.5)
    text = report.render()
    assert "GLOO_SOCKET_IFNAME" in text and "no-such-if0" in text
    assert "RANK=4 is outside WORLD_SIZE=2" in text
    assert "does not resolve" in text


def test_checkpoint_disk_estimate_grows_with_the_model(tmp_path):
    small = doctor.checkpoint_bytes(load_config(overrides=["model.size=tiny"]))
    base = doctor.checkpoint_bytes(load_config(overrides=["model.size=base"]))
    # BERT-base: ~110M parameters x (4 bytes x 3 + 2) ~ 1.5 GB.
    assert 1.2e9 < base < 2.0e9
    assert small < base / 20


def test_checkpoint_disk_estimate_uses_the_configured_vocabulary():
    # model.vocab_size set: the estimate must use it (a hard-coded 30522 made config_from_pipeline refuse it).
    small_vocab = doctor.checkpoint_bytes(load_config(overrides=["model.size=base", "model.vocab_size=1000"]))
    default = doctor.checkpoint_bytes(load_config(overrides=["model.size=base"]))
    assert default - small_vocab == (30522 - 1000) * 768 * (4 * 3 + 2)
    from_tokenizer = doctor.checkpoint_bytes(load_config(overrides=["model.size=base", "tokenizer.vocab_size=1000"]))
    assert from_tokenizer == small_vocab


def test_serve_on_the_cli_checks_rank0s_own_node_and_shares_the_checkpoint_dir(tmp_path, monkeypatch, capsys):
    from bertscale.cli import main

    seen: dict = {}

    def fake_handshake(port, peers, timeout, host="0.0.0.0", extra=None):
        marker = (extra or {}).get("checkpoint_marker")
        seen["marker"], seen["exists"] = marker, marker is not None and Path(marker).is_file()
        return []

    monkeypatch.setattr(doctor, "serve_handshake", fake_handshake)
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "no-such-if0")
    code = main(["doctor", "--serve", "--peers", "0", "--workdir", str(tmp_path), "--no-tracking"])
    out = capsys.readouterr().out
    assert seen["exists"] and Path(seen["marker"]).parent == tmp_path / "train" / "checkpoints"
    assert not Path(seen["marker"]).exists()  # removed after the handshakes
    assert "checkpoint disk" in out and "collective timeout" in out
    assert code == 1 and "no-such-if0" in out  # rank 0's own environment is checked too
