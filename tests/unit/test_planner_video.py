"""The dry-run planner counts video frames: tokens per video ([VIDEO] + frames x (n_query + 2))
and the whole videos a sequence holds under the token budget and the per-sequence image cap
(every frame is one image)."""

from __future__ import annotations

from pathlib import Path

from megatron_emu.config.io import load_config
from megatron_emu.planner import format_plan, plan
from megatron_emu.training.build import plan_spec

CONFIGS = Path(__file__).resolve().parents[2] / "examples" / "configs"


def test_planner_counts_video_frames():
    stage2 = CONFIGS / "emu2_37b_stage2.yaml"
    cfg = load_config(stage2, ["train.seq_length=2048"])
    report = plan(plan_spec(cfg))
    # 8 frames x (64 + 2) + [VIDEO] = 529 tokens; 8 images per sequence: one video
    assert report["video"] == {"frames_per_video": 8, "tokens_per_video": 529, "videos_per_sequence": 1}
    assert "8 frames (ViT images) = 529 tokens; at most 1 whole video(s)" in format_plan(report)
    # 16 images per sequence: 2 videos by the cap, 3 by the 2048 tokens (<s> and </s> aside)
    more = plan(plan_spec(load_config(stage2, ["train.seq_length=2048", "data.max_images_per_sequence=16"])))
    assert more["video"]["videos_per_sequence"] == 2
    # 4 frames, 40 images: 10 by the cap, 7 by the tokens (2046 // 265)
    few = plan(plan_spec(load_config(stage2, ["train.seq_length=2048", "data.max_images_per_sequence=40",
                                              "data.video_frames=4"])))
    assert few["video"] == {"frames_per_video": 4, "tokens_per_video": 265, "videos_per_sequence": 7}



def test_video_frames_must_be_positive():
    from megatron_emu.config.validate import config_errors

    tiny = CONFIGS / "emu2_tiny.yaml"
    assert not [e for e in config_errors(load_config(tiny)) if "video_frames" in e]
    assert any("data.video_frames (0) must be >= 1" in e
               for e in config_errors(load_config(tiny, ["data.video_frames=0"])))
