"""ImageNet weights at start: Keras' own download from a local HTTP server standing in for the weights host
(once, into the Keras cache, then used), and the one-line message when the host cannot be reached."""

from __future__ import annotations

import functools
import http.server
import importlib.util
import os
import threading

import h5py
import keras
import numpy as np
import pytest

from ranzcr_tf.model import weights
from ranzcr_tf.model.backbones import build_backbone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKBONE = "mobilenetv3_small"  # the smallest backbone with ImageNet weights (a 4 MB notop file)


class _Handler(http.server.SimpleHTTPRequestHandler):
    requests: list[str] = []

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.requests.append(self.path)
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def weights_host(tmp_path_factory):
    """A local server holding a valid (random) notop file under Keras' own name for ``BACKBONE``."""
    from keras.src.legacy.saving import legacy_h5_format

    served = tmp_path_factory.mktemp("host")
    fname = weights.imagenet_file(BACKBONE).fname
    source = keras.applications.MobileNetV3Small(include_top=False, weights=None, input_shape=(32, 32, 3),
                                                 include_preprocessing=True)
    with h5py.File(served / fname, "w") as handle:
        legacy_h5_format.save_weights_to_hdf5_group(handle, source)
    handler = functools.partial(_Handler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield {"url": f"http://127.0.0.1:{server.server_port}/", "fname": fname, "source": source}
    server.shutdown()
    server.server_close()


def test_keras_downloads_once_into_its_cache_and_the_backbone_uses_it(weights_host, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    monkeypatch.setenv(weights.WEIGHTS_URL_ENV, weights_host["url"])
    _Handler.requests.clear()
    path = weights.ensure_imagenet_weights(BACKBONE)
    assert path == str(tmp_path / "keras_home" / "models" / weights_host["fname"]) and os.path.isfile(path)
    assert _Handler.requests == [f"/{weights_host['fname']}"]
    assert f"downloading {weights_host['fname']} from {weights_host['url']}" in capsys.readouterr().out
    assert weights.ensure_imagenet_weights(BACKBONE) == path and len(_Handler.requests) == 1  # once
    backbone = build_backbone(BACKBONE, 32, weights="imagenet")
    for name in ("conv", "expanded_conv_project"):
        np.testing.assert_array_equal(backbone.get_layer(name).get_weights()[0],
                                      weights_host["source"].get_layer(name).get_weights()[0])


def _dead_url() -> str:
    import socket

    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


def test_offline_one_line_names_file_url_and_kaggle_before_records_are_read(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    url = _dead_url()
    monkeypatch.setenv(weights.WEIGHTS_URL_ENV, url)
    fname = weights.imagenet_file(BACKBONE).fname
    with pytest.raises(ValueError) as caught:
        weights.ensure_imagenet_weights(BACKBONE)
    message = str(caught.value)
    assert "\n" not in message and fname in message and f"{url}{fname}" in message
    assert "/kaggle/input/<your-dataset>/" in message and "~/.keras/models" in message
    assert not os.path.exists(tmp_path / "keras_home" / "models" / fname)

    # The CLI says it first: the records folder does not even exist, and the error is still the weights line.
    spec = importlib.util.spec_from_file_location("train_tpu", os.path.join(ROOT, "train_tpu.py"))
    train_tpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_tpu)
    capsys.readouterr()
    code = train_tpu.main(["--fold", "0", "--tfrecords", str(tmp_path / "no-records"), "--out-dir",
                           str(tmp_path / "run"), "--set", f"model.backbone={BACKBONE}", "--set", "model.weights=imagenet"])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(error) == 1 and fname in error[0] and "could not be downloaded" in error[0]
    assert not os.path.exists(tmp_path / "run")
