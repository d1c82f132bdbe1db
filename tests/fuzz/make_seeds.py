#!/usr/bin/env python3
"""wbroker fuzzing: writes the seed corpus, tests/fuzz/corpus/<target>/.

Small valid and invalid inputs per target, named for what they hold. The
seeds are checked in; run this again after changing it:
    python3 tests/fuzz/make_seeds.py
It rewrites corpus/*/ (regressions/ are not touched; scripts/fuzz adds to those).
"""

import json
import os
import shutil
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "corpus")


def safetensors(header, data=b"", raw_header=None):
    """A safetensors file: 8-byte little-endian length, JSON header, data."""
    text = raw_header if raw_header is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def safetensors_seeds():
    two = {
        "__metadata__": {"format": "pt"},
        "a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
        "b": {"dtype": "BF16", "shape": [3], "data_offsets": [16, 22]},
    }
    return {
        "valid_two_tensors": safetensors(two, bytes(22)),
        "valid_empty": safetensors({}),
        "valid_metadata_null": safetensors({"__metadata__": None}),
        "valid_scalar_and_empty": safetensors(
            {
                "s": {"dtype": "I64", "shape": [], "data_offsets": [0, 8]},
                "e": {"dtype": "U8", "shape": [0, 5], "data_offsets": [8, 8]},
            },
            bytes(8),
        ),
        "valid_f4_even": safetensors({"q": {"dtype": "F4", "shape": [4], "data_offsets": [0, 2]}}, bytes(2)),
        "valid_unknown_field": safetensors(
            {"t": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1], "extra": {"x": [1, [2]]}}},
            b"\x01",
        ),
        "invalid_truncated_data": safetensors(two, bytes(10)),
        "invalid_trailing_data": safetensors(two, bytes(30)),
        "invalid_overlap": safetensors(
            {
                "a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
                "b": {"dtype": "U8", "shape": [4], "data_offsets": [2, 6]},
            },
            bytes(6),
        ),
        "invalid_hole": safetensors({"a": {"dtype": "U8", "shape": [2], "data_offsets": [2, 4]}}, bytes(4)),
        "invalid_reversed": safetensors({"a": {"dtype": "U8", "shape": [0], "data_offsets": [4, 0]}}, bytes(4)),
        "invalid_dtype": safetensors({"a": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, bytes(16)),
        "invalid_f4_odd": safetensors({"q": {"dtype": "F4", "shape": [3], "data_offsets": [0, 2]}}, bytes(2)),
        "invalid_shape_overflow": safetensors(
            {"a": {"dtype": "F32", "shape": [2**32, 2**32], "data_offsets": [0, 0]}}
        ),
        "invalid_negative_dim": safetensors(
            None, raw_header=b'{"a":{"dtype":"U8","shape":[-1],"data_offsets":[0,0]}}'
        ),
        "invalid_float_offset": safetensors(
            None, raw_header=b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1.0]}}', data=b"\x00"
        ),
        "invalid_duplicate_key": safetensors(
            None,
            raw_header=b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},'
            b'"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}',
            data=b"\x00",
        ),
        "invalid_metadata_value": safetensors({"__metadata__": {"k": 1}}),
        "invalid_not_brace": safetensors(None, raw_header=b' {}'),
        "invalid_utf8": safetensors(None, raw_header=b'{"\xff":1}'),
        "invalid_nul": safetensors(None, raw_header=b'{}\x00garbage'),
        "invalid_deep": safetensors(
            None, raw_header=b'{"a":{"dtype":"U8","shape":[0],"data_offsets":[0,0],"x":' + b"[" * 200 + b"]" * 200 + b"}}"
        ),
        "invalid_length_too_big": struct.pack("<Q", 100_000_001) + b"{}",
        "invalid_length_past_eof": struct.pack("<Q", 64) + b"{}",
        "invalid_short": b"\x02\x00\x00",
        "invalid_not_json": safetensors(None, raw_header=b"{nope"),
    }


def index(weight_map, metadata=None, **extra):
    doc = {"metadata": metadata or {"total_size": 1234}, "weight_map": weight_map}
    doc.update(extra)
    return json.dumps(doc, indent=2).encode()


def shard_index_seeds():
    return {
        "valid_two_shards": index(
            {
                "model.embed.weight": "model-00001-of-00002.safetensors",
                "model.layers.0.w": "model-00001-of-00002.safetensors",
                "lm_head.weight": "model-00002-of-00002.safetensors",
            }
        ),
        "valid_nested_dir": index({"a": "shards/part-1.safetensors"}, {"format": "pt", "n": 1.5, "ok": True}),
        "valid_no_metadata": b'{"weight_map":{"x":"x.safetensors"}}',
        "invalid_empty_map": index({}),
        "invalid_not_object": b'[{"weight_map":{}}]',
        "invalid_no_map": b'{"metadata":{}}',
        "invalid_map_array": b'{"weight_map":["a.safetensors"]}',
        "invalid_value_number": b'{"weight_map":{"a":7}}',
        "invalid_dotdot": index({"a": "../../etc/passwd"}),
        "invalid_absolute": index({"a": "/etc/passwd"}),
        "invalid_empty_name": index({"a": ""}),
        "invalid_nul_name": b'{"weight_map":{"a":"x\\u0000.safetensors"}}',
        "invalid_duplicate_tensor": b'{"weight_map":{"a":"1.safetensors","a":"2.safetensors"}}',
        "invalid_json": b'{"weight_map":{"a":"1.safetensors"',
        "invalid_utf8": b'{"weight_map":{"\xc3\x28":"1.safetensors"}}',
        # 64 levels (the limit): root, "metadata", 62 arrays.
        "valid_nested_64": b'{"weight_map":{"a":"x.safetensors"},"metadata":{"n":'
        + b"[" * 62 + b"]" * 62 + b"}}",
        "invalid_nested_65": b'{"weight_map":{"a":"x.safetensors"},"metadata":{"n":'
        + b"[" * 63 + b"]" * 63 + b"}}",
    }


def revision_resolver_seeds():
    a = "a1b2c3d4e5f60718293a4b5c6d7e8f9012345678"
    return {
        "hub_main": b"org/model\nmain\n",
        "hub_default": b"org/model\n",
        "hub_tag": b"org/model\nv1.0\n",
        "hub_pr_ref": b"org/model\nrefs/pr/1\n",
        "hub_pr_short": b"org/model\npr/1\n",
        "hub_full_commit": ("org/model\n" + a + "\n").encode(),
        "hub_upper_prefix": b"org/model\nA1B2C3D\n",
        "hub_ambiguous_prefix": b"org/model\ndeadbee2\n",
        "hub_ref_like_prefix": b"org/model\ndeadbee\n",
        "hub_short_prefix": b"org/model\na1b2c3\n",
        "hub_missing_commit_ref": b"org/model\ngone\n",
        "hub_garbage_ref": b"org/model\ngarbage\n",
        "hub_ref_dir": b"org/model\na-directory\n",
        "hub_ref_symlink_out": b"org/model\nlinked-out\n",
        "hub_fuzz_ref_ok": ("org/model\nfuzz\n" + a + "\n").encode(),
        "hub_fuzz_ref_spaces": ("org/model\nfuzz\n \t" + a + " \r\n").encode(),
        "hub_fuzz_ref_garbage": b"org/model\nfuzz\n\x00\xff not a commit",
        "hub_dotdot": b"org/model\n../../../outside/secret\n",
        "hub_dot_component": b"org/model\nrefs/./main\n",
        "hub_absolute_rev": b"org/model\n/etc/passwd\n",
        "hub_backslash": b"org/model\nrefs\\main\n",
        "hub_nul_rev": b"org/model\nma\x00in\n",
        "hub_solo": b"solo\nmain\n",
        "hub_unknown_model": b"org/other\nmain\n",
        "bad_repo_id": b"org/mo--del\nmain\n",
        "bad_repo_id_chars": b"org/m@del\nmain\n",
        "bad_three_parts": b"a/b/c\nmain\n",
        "repo_file_escape": b"org/model\nescape\n",
        "repo_file_escape_rel": b"org/model\nescape-rel\n",
        "repo_file_loop": b"org/model\nloop\n",
        "repo_file_dangling": b"org/model\ndangling\n",
        "repo_file_nested": b"org/model\nsub/config.json\n",
        "repo_file_other_snapshot": b"org/model\nother-snapshot/model.safetensors\n",
        "repo_file_dir": b"org/model\ndir\n",
        "local_plain": b"/local-plain\nmain\n",
        "local_plain_rev": b"/local-plain\nv1\n",
        "local_one_prefix": b"/local-one\na1b2c3d4\n",
        "local_one_wrong": b"/local-one\nb0b0b0b0\n",
        "local_fuzz_meta": ("/local-fuzz\nmain\n" + a + "\netag\n").encode(),
        "local_fuzz_meta_bad": b"/local-fuzz\nmain\nnot hex\n",
        "local_two_agree": ("/local-two\nmain\n" + a + "\n").encode(),
        "local_two_mixed": b"/local-two\nmain\nb0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0\n",
        "local_trailing_slash": b"/local-one/\nmain\n",
        "local_not_dir": b"/file-not-dir\nmain\n",
        "local_missing": b"/nowhere\nmain\n",
        "local_at_in_name": b"/local-one@x\n\n",
        "empty": b"",
    }


def frame(body, version=1, flags=0, length=None):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    n = len(data) if length is None else length
    return b"WBRK" + struct.pack("<HHI", version, flags, n) + data


def frame_decoder_seeds():
    manifest = [["w", "F32", [2, 3], 0, 24], ["b", "BF16", [4], 256, 8]]
    return {
        "hello": frame({"op": "hello", "protocol": 1, "id": 1, "client": "fuzz"}),
        "hello_then_attach": frame({"op": "hello", "protocol": 1, "id": 1})
        + frame({"op": "attach", "id": 2, "model": "org/model", "revision": "main", "dtype": "bf16"}),
        "attach_reply": frame(
            {"ok": True, "id": 2, "lease": 7, "size": 4096, "arena": {"kind": "memfd", "size": 4096},
             "fds": 1, "tensors": manifest}
        ),
        "attach_reply_overlap": frame({"ok": True, "size": 100, "tensors": [["w", "F32", [100], 0, 400]]}),
        "attach_reply_unaligned": frame({"ok": True, "size": 4096, "tensors": [["w", "U8", [1], 3, 1]]}),
        "attach_reply_dup": frame({"ok": True, "size": 4096, "tensors": [["w", "U8", [1], 0, 1], ["w", "U8", [1], 256, 1]]}),
        "attach_reply_badrow": frame({"ok": True, "tensors": [["w", "U8", [1], 0]]}),
        "error_reply": frame({"ok": False, "id": "x", "error": {"code": "not_found", "message": "no"}}),
        # 64 levels (the limit): the body, then 63 arrays.
        "id_nested_64": frame(b'{"op":"ping","id":' + b"[" * 63 + b"]" * 63 + b"}"),
        "id_nested_65": frame(b'{"op":"ping","id":' + b"[" * 64 + b"]" * 64 + b"}"),
        "id_nested_in_string": frame(b'{"op":"ping","id":"' + b"[" * 100 + b'\\"{"}'),
        "id_nested": frame({"op": "ping", "id": {"a": [1, 2, {"b": None}], "c": 1.5e300}}),
        "status": frame({"op": "status", "id": 3}),
        "empty_object": frame(b"{}"),
        "empty_body": frame(b""),
        "body_array": frame(b"[1,2]"),
        "body_not_json": frame(b"{op:"),
        "body_bad_utf8": frame(b'{"op":"\xff"}'),
        "bad_magic": b"XBRK" + frame({"op": "ping"})[4:],
        "bad_version": frame({"op": "ping"}, version=2),
        "bad_flags": frame({"op": "ping"}, flags=1),
        "length_too_big": frame(b"{}", length=0xFFFFFFFF),
        "length_short_body": frame(b"{}", length=40),
        "partial_header": b"WBRK\x01\x00",
        "two_then_garbage": frame({"op": "ping", "id": 1}) + frame({"op": "ping", "id": 2}) + b"junk-junk-junk",
        "numbers": frame(b'{"a":-0,"b":18446744073709551616,"c":1e-400,"d":[0.1,-1,12345678901234567890]}'),
        "unicode": frame('{"s":"\\ud83d\\ude00 \u00e9","t":"\\u0000"}'.encode()),
        "lone_surrogate": frame(b'{"s":"\\ud800"}'),
    }


def broker_config_seeds():
    return {
        "full": b"""# wbrokerd.toml
socket = "/run/wbroker/wbroker.sock"
socket_mode = "0660"
socket_group = "wbroker"
cache_dir = "/var/cache/huggingface/hub"
device = ["cpu", "cuda:0"]
cuda_sharing = "auto"
dtype = "bf16"
max_memory = "64GiB"
log_level = "info"
load_on_attach = true
loader_threads = 8
max_connections = 1024
max_frame_bytes = 16777216
hello_timeout_ms = 5000
preload = [
  "org/model@main",
  { model = "/srv/models/llama", revision = "a1b2c3d", dtype = "fp16", device = "cuda:0" },
]
""",
        "preload_tables": b"""[[preload]]
model = "org/model"
revision = "v1.0"

[[preload]]
model = "sentence-transformers/all-MiniLM-L6-v2"
""",
        "minimal": b'device = "cpu"\n',
        "empty": b"",
        "max_memory_int": b"max_memory = 1073741824\n",
        "unknown_key": b'sokcet = "/tmp/x"\n',
        "wrong_types": b'loader_threads = "4"\nload_on_attach = 1\n',
        "bounds": b"loader_threads = 0\nmax_frame_bytes = 100\nhello_timeout_ms = -1\n",
        "bad_mode": b'socket_mode = "0999"\n',
        "bad_device_list": b'device = "cpu,,cuda:0"\n',
        "empty_device_array": b"device = []\n",
        "bad_preload": b'preload = [{ model = "", revision = 3 }]\n',
        "bad_preload_key": b'preload = [{ model = "org/m", revsion = "x" }]\n',
        "bad_size": b'max_memory = "12 parsecs"\n',
        "syntax_error": b'socket = "unterminated\n',
        "nested_arrays": b"device = [[[[\"cpu\"]]]]\n",
        "dates_and_floats": b"max_memory = 1979-05-27T07:32:00Z\nloader_threads = 4.0\n",
        "unicode_escapes": b'socket_group = "\\u00e9\\U0001F600"\nlog_level = """multi\nline"""\n',
        "bad_utf8": b'socket_group = "\xff\xfe"\n',
        "access_rules": b"""admin_group = "wbroker-admin"
max_leases_per_client = 64
idle_timeout_ms = 30000

[[access]]
model = "org/*"
uids = [1000, 1001]
groups = ["wbroker", "0"]

[[access]]
model = "/srv/models/private"
groups = ["root"]
""",
        "bad_access": b'[[access]]\nmodel = ""\nuids = [-1, "x"]\ngroups = ["no-such-group"]\nextra = 1\n',
        "socket_mode_cli": b"0660",
        "device_list_cli": b" cuda:0 , cuda:1 ",
    }


def main():
    seeds = {
        "safetensors_header": safetensors_seeds(),
        "shard_index": shard_index_seeds(),
        "revision_resolver": revision_resolver_seeds(),
        "frame_decoder": frame_decoder_seeds(),
        "broker_config": broker_config_seeds(),
    }
    for target, files in seeds.items():
        out = os.path.join(CORPUS, target)
        shutil.rmtree(out, ignore_errors=True)
        os.makedirs(out)
        for name, data in files.items():
            with open(os.path.join(out, name), "wb") as f:
                f.write(data)
        total = sum(len(d) for d in files.values())
        print(f"{target}: {len(files)} seeds, {total} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
