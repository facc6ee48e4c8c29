"""BEVFormer behind ``zoo serve``: a request is read as the data reads its samples (the synthetic scenes and the
nuScenes info files give the same batches through the codec as through the predict loader), a bad request is
refused naming its field, and the real server answers with the record ``zoo predict`` writes."""

from __future__ import annotations

import base64
import copy
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from tests.bev.test_data import POSES, write_fixture
from tests.conftest import CONFIGS
from tests.serving.server import post, running_server
from zoo.datamodules.bev import BEVDetectionDataModule, BEVRequestCodec, lidar2img_from_calibration
from zoo.datamodules.bev_scenes import CAMERA_NAMES
from zoo.serving import RequestError, json_record

CONFIG = CONFIGS / "bev" / "bevformer_cpu.yaml"
TINY = [
    '--model.init_args.model_kwargs={"num_query": 20, "bev_h": 12, "bev_w": 12, "encoder_layers": 1, '
    '"decoder_layers": 2}',
    "--data.init_args.img_size=[32, 56]",
    "--data.init_args.test_scenes=1",
    "--data.init_args.frames_per_scene=2",
    "--data.init_args.num_objects=8",
    "--data.init_args.batch_size=1",
]


def png_base64(pixels: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def synthetic_requests(dataset) -> list[dict]:
    """A request per frame of the first synthetic scene: its rendered images, ``lidar2img`` and pose, and the
    frame before it. The CAN bus is given as info files give it (positions and headings, here summed from
    the scene's deltas), which the codec turns back into the deltas."""
    frames = dataset.scene(0)["frames"]
    position = np.zeros(3)
    heading = 0.0
    raw = []
    for n, frame in enumerate(frames):
        vector = frame["can_bus"].double().numpy().copy()
        if n:  # the first frame's deltas are zero in the data: it starts the scene
            position, heading = position + vector[0:3], heading + vector[17]
        vector[0:3], vector[17] = position, heading
        raw.append(vector.tolist())

    def frame_request(n: int) -> dict:
        cameras = {
            name: {"image": png_base64(frames[n]["images"][c]), "lidar2img": dataset.lidar2img[c].tolist()}
            for c, name in enumerate(CAMERA_NAMES)
        }
        return {"cameras": cameras, "can_bus": raw[n]}

    return [
        {
            "id": f"test_scene000_frame{n:02d}",
            **frame_request(n),
            "previous": [frame_request(n - 1)] if n else [],
            "lidar2global": frames[n]["lidar2global"].tolist(),
        }
        for n in range(len(frames))
    ]


def info_requests(root) -> list[dict]:
    """A request per sample of an info file: the image files as sent, the calibration of the info file (one
    camera as its ``lidar2img`` instead), its raw CAN bus and poses, and the previous sample of the scene."""
    infos = json.loads((root / "infos.json").read_text())["infos"]

    def frame_request(info: dict) -> dict:
        cameras = {}
        for name, entry in info["cams"].items():
            calibration = {
                k: entry[k] for k in ("cam_intrinsic", "sensor2lidar_rotation", "sensor2lidar_translation")
            }
            if name == "CAM_BACK":
                calibration = {"lidar2img": lidar2img_from_calibration(*calibration.values()).tolist()}
            image = base64.b64encode((root / entry["data_path"]).read_bytes()).decode("ascii")
            cameras[name] = {"image": image, **calibration}
        return {"cameras": cameras, "can_bus": info["can_bus"]}

    return [
        {
            "id": info["token"],
            **frame_request(info),
            "previous": [frame_request(infos[n - 1])] if n else [],
            **POSES,
        }
        for n, info in enumerate(infos)
    ]


def assert_same_batch(served: dict, loaded: dict) -> None:
    assert set(served) == set(loaded)
    for key, value in loaded.items():
        if key == "sample_id":  # a request is no item of a data set
            assert served[key].tolist() == [-1] * len(value)
        elif isinstance(value, torch.Tensor):
            assert served[key].dtype == value.dtype and torch.equal(served[key], value), key
        else:
            assert len(served[key]) == len(value) and all(
                torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
                for a, b in zip(served[key], value)
            ), key


def test_requests_give_the_predict_loaders_batch_for_synthetic_scenes():
    data = BEVDetectionDataModule(batch_size=2, img_size=(32, 56), queue_length=2, test_scenes=1,
                                  frames_per_scene=2, num_objects=8)  # fmt: skip
    data.setup("predict")
    loaded = next(iter(data.predict_dataloader()))
    codec = data.request_codec()
    served = codec.collate([codec.parse(r) for r in synthetic_requests(data.predict_set)])
    assert served["prev_exists"].tolist() == [[False, False], [False, True]]
    for key in ("gt_boxes", "gt_labels", "gt_attributes"):  # requests carry no ground truth
        assert [len(v) for v in served[key]] == [0, 0]
        served[key] = loaded[key]
    assert_same_batch(served, loaded)


def test_requests_give_the_predict_loaders_batch_for_info_files(tmp_path):
    write_fixture(tmp_path)  # 160 x 90 images, resized to 80 x 45 with their matrices
    infos = json.loads((tmp_path / "infos.json").read_text())
    for info in infos["infos"]:  # a predict file: no annotations
        del info["gt_boxes"], info["gt_names"], info["gt_velocity"], info["valid_flag"]
    (tmp_path / "test_infos.json").write_text(json.dumps(infos))
    data = BEVDetectionDataModule(batch_size=2, img_size=(45, 80), queue_length=3, data_root=str(tmp_path),
                                  predict_info="test_infos.json")  # fmt: skip
    data.setup("predict")
    loaded = next(iter(data.predict_dataloader()))
    codec = data.request_codec()
    served = codec.collate([codec.parse(r) for r in info_requests(tmp_path)])
    assert served["prev_exists"].tolist() == [[False, False, False], [False, False, True]]
    assert served["can_bus"][1, 2, 17].item() == pytest.approx(5.0)  # the heading change, from raw headings
    assert_same_batch(served, loaded)


def good_request() -> dict:
    pixels = np.zeros((32, 56, 3), dtype=np.uint8)
    frame = {
        "cameras": {
            name: {"image": png_base64(pixels), "lidar2img": np.eye(4).tolist()} for name in CAMERA_NAMES
        },
        "can_bus": [0.0] * 18,
    }
    return {**frame, "previous": [copy.deepcopy(frame)]}


def without(mapping: dict, key: str) -> dict:
    mapping.pop(key)
    return mapping


BAD_REQUESTS = {
    "cameras.CAM_BACK": lambda r: without(r["cameras"], "CAM_BACK"),
    "cameras.CAM_TOP": lambda r: r["cameras"].update(CAM_TOP=r["cameras"]["CAM_FRONT"]),
    "cameras.CAM_FRONT.image": lambda r: r["cameras"]["CAM_FRONT"].update(image="not base64!"),
    "cameras.CAM_FRONT.lidar2img": lambda r: r["cameras"]["CAM_FRONT"].update(lidar2img=[[1, 0, 0, 0]] * 3),
    "cameras.CAM_FRONT.cam_intrinsic": lambda r: r["cameras"]["CAM_FRONT"].update(
        cam_intrinsic=np.eye(3).tolist()
    ),
    "cameras.CAM_FRONT_LEFT.sensor2lidar_rotation": lambda r: r["cameras"].update(
        CAM_FRONT_LEFT={
            "image": r["cameras"]["CAM_FRONT_LEFT"]["image"],
            "cam_intrinsic": np.eye(3).tolist(),
            "sensor2lidar_translation": [0.0, 0.0, 0.0],
        }
    ),
    "can_bus": lambda r: r.update(can_bus=[0.0] * 17),
    "previous": lambda r: r["previous"].append(r["previous"][0]),
    "previous[0].cameras.CAM_BACK_LEFT.image": lambda r: without(
        r["previous"][0]["cameras"]["CAM_BACK_LEFT"], "image"
    ),
    "previous[0].can_bus": lambda r: r["previous"][0].update(can_bus=["fast"] * 18),
    "previous[0].lidar2global": lambda r: r["previous"][0].update(lidar2global=np.eye(4).tolist()),
    "lidar2global": lambda r: r.update(lidar2global=[[1, 0], [0, 1]]),
    "ego2global_translation": lambda r: r.update(ego2global_rotation=[1, 0, 0, 0]),
    "camera": lambda r: r.update(camera={}),
}


@pytest.mark.parametrize("field", list(BAD_REQUESTS))
def test_bad_requests_name_the_field(field):
    codec = BEVRequestCodec((32, 56), queue_length=2)
    codec.parse(good_request())
    request = good_request()
    BAD_REQUESTS[field](request)
    with pytest.raises(RequestError) as error:
        codec.parse(request)
    assert error.value.field == field, str(error.value)


def test_zoo_serve_answers_with_the_predict_record(tmp_path, single_thread):
    from zoo.inference import load_trained_model

    config = ["--config", str(CONFIG), *TINY]
    trained = load_trained_model(config, None)
    checkpoint = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": trained.module.state_dict()}, checkpoint)
    trained = load_trained_model(config, str(checkpoint))
    with torch.no_grad():
        offline = [
            json_record(record)
            for n, batch in enumerate(trained.datamodule.predict_dataloader())
            for record in trained.module.predict_step(batch, n)
        ]
    requests = synthetic_requests(trained.datamodule.predict_set)
    bad = copy.deepcopy(requests[1])
    del bad["previous"][0]["cameras"]["CAM_BACK"]
    with running_server([*config, f"--ckpt_path={checkpoint}"], tmp_path) as url:
        answers = [post(f"{url}/predict", request) for request in requests]
        refused = post(f"{url}/predict", bad)
        again = post(f"{url}/predict", requests[1])
    assert [status for status, _ in answers] == [200, 200]
    for (_, answer), record in zip(answers, offline):
        assert answer["id"] == record["id"] and len(answer["boxes"]) == len(record["boxes"]) == 100
        # the same boxes; the top-down picture differs by the ground truth only the data set has
        assert answer["boxes"] == record["boxes"]
        assert set(answer["top_down"]) == {"png_base64"}
    assert refused[0] == 422 and refused[1]["field"] == "previous[0].cameras.CAM_BACK"
    assert again == answers[1]
