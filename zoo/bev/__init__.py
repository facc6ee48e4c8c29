"""BEVFormer: multi-camera 3D detection with spatial and temporal attention, in pure PyTorch (timm backbone).

``from zoo.bev import BEVFormer, BEVFORMER_CONFIGS`` gives the network; ``BEVFormerDetector`` the
LightningModule (which also reads checkpoints written before ``model_name`` / ``model_kwargs`` / ``img_size``);
``NuScenesDetectionMetric`` the nuScenes detection metrics; ``FrameGraph`` / ``run_queue`` one frame as an exported
graph and the temporal loop around it. ``BEVFormerPlanner`` adds an end-to-end planning head (``PlanningHead``),
``EgoStatusPlanner`` is the ego-status baseline, ``PlanningMetric`` the open-loop planning metrics, ``pure_pursuit`` waypoints to steering and acceleration.
"""

from zoo.bev.backbone import FPN, CameraEncoder
from zoo.bev.control import pure_pursuit
from zoo.bev.decoder import DetectionDecoder, DetectionDecoderLayer
from zoo.bev.deformable import MultiScaleDeformableAttention, multi_scale_deformable_attention
from zoo.bev.ego_mlp import EgoStatusMLP, EgoStatusPlanner
from zoo.bev.encoder import BEVEncoder, BEVEncoderLayer, SpatialCrossAttention, TemporalSelfAttention
from zoo.bev.export import FrameGraph, run_queue
from zoo.bev.geometry import align_previous_bev, project_to_cameras
from zoo.bev.head import DetectionHead, decode_boxes, encode_boxes, hungarian_match
from zoo.bev.metrics import NuScenesDetectionMetric
from zoo.bev.model import BEVFORMER_CONFIGS, NUSCENES_CLASSES, BEVFormer, BEVFormerConfig
from zoo.bev.module import BEVFormerDetector
from zoo.bev.planner import PlanningHead
from zoo.bev.planning_metrics import PlanningMetric
from zoo.bev.planning_module import BEVFormerPlanner
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
    "BEVFormerPlanner",
    "CameraEncoder",
    "DetectionDecoder",
    "DetectionDecoderLayer",
    "DetectionHead",
    "EgoStatusMLP",
    "EgoStatusPlanner",
    "FrameGraph",
    "MultiScaleDeformableAttention",
    "NuScenesDetectionMetric",
    "PlanningHead",
    "PlanningMetric",
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
    "pure_pursuit",
    "run_queue",
]
