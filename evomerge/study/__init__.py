"""The study service's database: studies, trials, metrics per fidelity, snapshots, exports."""

from evomerge.study.store import StorageError, StudyStore, TrialView, mask_url, storage_url

__all__ = ["StorageError", "StudyStore", "TrialView", "mask_url", "storage_url"]
