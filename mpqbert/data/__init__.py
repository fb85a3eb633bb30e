"""GLUE data: task registry, loading, tokenization, batching (in memory or streamed) and metrics."""

from mpqbert.data import streaming

from mpqbert.data.batching import Batch
from mpqbert.data.batching import TokenizedDataset
from mpqbert.data.batching import bucket_length
from mpqbert.data.batching import eval_batches
from mpqbert.data.batching import num_train_batches
from mpqbert.data.batching import pad_to_length
from mpqbert.data.batching import random_batch
from mpqbert.data.batching import restore_order
from mpqbert.data.batching import shards_of_process
from mpqbert.data.batching import tokenize
from mpqbert.data.batching import tokenize_shards
from mpqbert.data.batching import train_batches
from mpqbert.data.batching import train_batches_from
from mpqbert.data.prefetch import prefetch
from mpqbert.data.streaming import StreamingSet
from mpqbert.data.glue import Examples
from mpqbert.data.glue import GLUE_DIR_ENV_VAR
from mpqbert.data.glue import GlueTask
from mpqbert.data.glue import HUB_DATASET
from mpqbert.data.glue import TASKS
from mpqbert.data.glue import get_task
from mpqbert.data.glue import load_split
from mpqbert.data.glue import read_tsv
from mpqbert.data.glue import resolve_glue_dir
from mpqbert.data.metrics import accuracy
from mpqbert.data.metrics import f1_binary
from mpqbert.data.metrics import glue_metrics
from mpqbert.data.metrics import matthews_corrcoef
from mpqbert.data.metrics import pearson
from mpqbert.data.metrics import spearman

__all__ = [
    "Batch",
    "Examples",
    "GLUE_DIR_ENV_VAR",
    "GlueTask",
    "HUB_DATASET",
    "TASKS",
    "StreamingSet",
    "TokenizedDataset",
    "accuracy",
    "bucket_length",
    "eval_batches",
    "f1_binary",
    "get_task",
    "glue_metrics",
    "load_split",
    "matthews_corrcoef",
    "num_train_batches",
    "pad_to_length",
    "random_batch",
    "pearson",
    "prefetch",
    "read_tsv",
    "resolve_glue_dir",
    "restore_order",
    "shards_of_process",
    "spearman",
    "streaming",
    "tokenize",
    "tokenize_shards",
    "train_batches",
    "train_batches_from",
]
