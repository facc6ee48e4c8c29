"""BEVFormer: multi-camera 3D detection with spatial and temporal attention, in pure PyTorch (timm backbone).

``from zoo.bev import BEVFormer, BEVFORMER_CONFIGS`` gives the network; ``BEVFormerDetector`` the
LightningModule (which also reads checkpoints written before ``model_name`` / ``model_kwargs`` / ``img_size``);
``NuScenesDetectionMetric`` the nuScenes detection metrics; ``FrameGraph`` / ``run_queue`` one frame as an exported
graph and the temporal loop around it.
"""

from zoo.bev.backbone import FPN, CameraEncoder
from zoo.bev.decoder import DetectionDecoder, DetectionDecoderLayer
from zoo.bev.deformable import MultiScaleDeformableAttention, multi_scale_deformable_attention
from zoo.bev.encoder import BEVEncoder, BEVEncoderLayer, SpatialCrossAttention, TemporalSelfAttention
from zoo.bev.export import FrameGraph, run_queue
from zoo.bev.geometry import align_previous_bev, project_to_cameras
from zoo.bev.head import DetectionHead, decode_boxes, encode_boxes, hungarian_match
from zoo.bev.metrics import NuScenesDetectionMetric
from zoo.bev.model import BEVFORMER_CONFIGS, NUSCENES_CLASSES, BEVFormer, BEVFormerConfig
from zoo.bev.module import BEVFormerDetector
from zoo.bev.records import box_to_submission, draw_top_down

__all__ = [
    "BEVFORMER_CONFIGS",
    "FPN",
    "NUSCENES_CLASSES",
    "BEVEncoder",
    "BEVEncoderLayer",
    "BEVFormer",
    "BEVFormerConfig",
    "BEVFormerDetector",
    "CameraEncoder",
    "DetectionDecoder",
    "DetectionDecoderLayer",
    "DetectionHead",
    "FrameGraph",
    "MultiScaleDeformableAttention",
    "NuScenesDetectionMetric",
    "SpatialCrossAttention",
    "TemporalSelfAttention",
    "align_previous_bev",
    "box_to_submission",
    "decode_boxes",
    "draw_top_down",
    "encode_boxes",
    "hungarian_match",
    "multi_scale_deformable_attention",
    "project_to_cameras",
    "run_queue",
]
