"""loco_det.records: each run file format is one dataclass; a file as the tools wrote it reads
back and writes again to the same JSON (so older run folders keep loading), and optional keys
stay absent when unset."""
import json

import pytest

from loco_det.records import (ABSENT, DetectionResults, DetectionRunInfo, KnnRecord,
                              PretrainRunInfo, PretrainSummary, ReadoutRecord, RecordError,
                              RunInfo)

PROVENANCE = {"git_commit": "abc", "world_size": 1, "argv": ["tools/x.py"], "versions": {}}
EXAMPLES = [
    (PretrainRunInfo, dict(PROVENANCE, kind="pretrain", method="loco", arch="resnet18",
                           global_batch=8, epochs=1, config_file="pretrain/cpu_loco.yaml",
                           seed=0, fingerprint="93c49392a831c99d", device="cpu",
                           dataset_images=24, steps_per_epoch=3)),
    (PretrainSummary, {"finished": True, "epochs": 1, "steps": 3, "param_sha256": ["x"],
                       "final_losses": {"unit1": 2.9}, "bad_images": 0, "world_size": 1,
                       "wall_time_s": 12.5}),
    (ReadoutRecord, {"kind": "readout", "checkpoint": "/r/checkpoint_last.pth", "method": "loco",
                     "arch": "resnet18", "top1": {"res5": 12.5}, "top1_stderr": {"res5": 11.7},
                     "protocol": {"name": "small", "seed": 0}, "checkpoint_fingerprint": "93c4",
                     "checkpoint_seed": 0, "fingerprint": "c865"}),
    (KnnRecord, {"kind": "knn", "checkpoint": None, "method": "random", "arch": "resnet18",
                 "top1": {"k20": {"res5": 30.0}}, "top1_stderr": {"k20": {"res5": 5.0}},
                 "protocol": {"name": "weighted_knn", "ks": [20]}}),
    (DetectionRunInfo, dict(PROVENANCE, kind="detection", config_file="c.yaml",
                            eval_only=False, resume=False)),
    (DetectionResults, {"kind": "detection", "finished": True, "eval_only": False,
                        "bbox": {"AP": 1.0}, "segm": None, "headline_dataset": "d",
                        "evaluators": ["COCOEvaluator"], "metrics": {}, "method": "loco",
                        "protocol": {"seed": 0}, "fingerprint": "f", "weights_fingerprint": "w",
                        "weights_seed": None, "weights_source": None, "sem_seg": None,
                        "iteration": 9, "notes": ["x"]}),
]


@pytest.mark.parametrize("cls,data", EXAMPLES, ids=[c.__name__ for c, _ in EXAMPLES])
def test_a_written_file_reads_back_and_writes_the_same_json(cls, data, tmp_path):
    record = cls.from_json(data)
    assert record.to_json() == data
    path = record.write(str(tmp_path))
    assert cls.read(path).to_json() == data
    with open(path) as f:
        assert json.load(f) == data


def test_optional_keys_are_left_out_until_set_and_null_is_kept():
    record = DetectionResults(finished=True)
    assert record.sem_seg is ABSENT and "sem_seg" not in record.to_json()
    record.sem_seg = None     # a semantic-segmentation run without a result writes null
    assert record.to_json()["sem_seg"] is None
    assert "comm_last_step" not in PretrainSummary(finished=True).to_json()


def test_an_older_file_without_newer_fields_still_reads():
    old = ReadoutRecord.from_json({"kind": "readout", "method": "e2e", "top1": {"res5": 1.0}})
    assert old.fingerprint is None and old.checkpoint_seed is None and old.top1 == {"res5": 1.0}


def test_the_kind_of_run_info_picks_its_record_and_a_wrong_kind_is_refused(tmp_path):
    path = tmp_path / "run_info.json"
    path.write_text(json.dumps(dict(PROVENANCE, kind="detection", config_file="c.yaml")))
    assert type(RunInfo.read_any(str(path))) is DetectionRunInfo
    with pytest.raises(RecordError, match="kind 'detection', expected 'pretrain'"):
        PretrainRunInfo.read(str(path))
    path.write_text("{not json")
    with pytest.raises(RecordError, match="unreadable run_info.json"):
        RunInfo.read_any(str(path))
