"""Records, the builtin corpus, loaders, the split and the prompt template."""
from kdaudit.data.records import Record, RecordError, load_records, read_jsonl, write_jsonl
from kdaudit.data.splits import SplitError, Splits, split_records
from kdaudit.data.template import Encoded, encode_prompt, encode_record, format_prompt, format_text

__all__ = ["Encoded", "Record", "RecordError", "SplitError", "Splits", "encode_prompt",
           "encode_record", "format_prompt", "format_text", "load_records", "read_jsonl",
           "split_records", "write_jsonl"]
