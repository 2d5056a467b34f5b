"""The encrypted adapter store: sealing, fail-closed loads, atomic saves under SIGKILL, rotation, deletion."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sqlite3
import time
from pathlib import Path

import pytest
import torch

from prisp.adapters import LoraSpec, LoraWeights, random_init
from prisp.errors import PrispError
from prisp.serve.auth import bearer_token, hash_token, issue_token, token_matches, valid_user_id
from prisp.serve.blobs import adapter_from_bytes, adapter_to_bytes
from prisp.serve.keys import (
    KEY_ENV,
    SealError,
    StoreKey,
    decode_key,
    generate_key,
    load_key,
    seal,
    slot_aad,
    unseal,
)
from prisp.serve.registry import AdapterCache
from prisp.serve.store import DB_NAME, AdapterStore, SaveRequest, UnknownUserError, VersionConflictError

SHAPES = {(0, "q_proj"): (8, 8), (0, "v_proj"): (8, 4), (1, "q_proj"): (8, 8), (1, "v_proj"): (8, 4)}


def make_weights(seed: int) -> LoraWeights:
    """A small adapter with non-zero B, distinct per seed."""
    weights = random_init(SHAPES, LoraSpec(r=2), seed=seed)
    generator = torch.Generator().manual_seed(seed + 1000)
    for pair in weights.pairs.values():
        pair.B.normal_(0, 1, generator=generator)
    return weights


def assert_same(a: LoraWeights, b: LoraWeights) -> None:
    assert a.spec == b.spec and a.pairs.keys() == b.pairs.keys()
    for key in a.pairs:
        assert torch.equal(a.pairs[key].A, b.pairs[key].A) and torch.equal(a.pairs[key].B, b.pairs[key].B)


def new_user(store: AdapterStore) -> str:
    issued = issue_token()
    store.create_user(issued.user_id, issued.token_hash)
    return issued.user_id


def save(store: AdapterStore, user: str, weights: LoraWeights, task: str = "LaMP-4", continues=None):
    return store.save(SaveRequest(user, task, "tiny", "prisp", items=3, continues=continues), weights)


@pytest.fixture
def key() -> StoreKey:
    return generate_key()


@pytest.fixture
def store(tmp_path, key):
    with AdapterStore(tmp_path / "store", key) as opened:
        yield opened


# ---- keys and tokens ---------------------------------------------------------------------------


def test_key_sources_and_one_line_errors(tmp_path, caplog):
    key = generate_key()
    assert decode_key(key.encode(), "x") == key and key.encode() not in repr(key)
    (tmp_path / "k").write_text(key.encode() + "\n")
    (tmp_path / "k").chmod(0o600)
    with caplog.at_level("WARNING"):
        assert load_key(tmp_path / "k", environ={}) == key
        assert "readable by other users" not in caplog.text
        (tmp_path / "k").chmod(0o644)
        assert load_key(tmp_path / "k", environ={}) == key  # still loads, with a warning
    assert "readable by other users (mode 644): chmod 600 it" in caplog.text
    assert load_key(None, environ={KEY_ENV: key.encode()}) == key
    bad = {"missing": (None, {}), "not base64": (None, {KEY_ENV: "not base64!!"}),
           "short": (None, {KEY_ENV: "c2hvcnQ="}), "no file": (tmp_path / "nope", {})}
    for name, (path, env) in bad.items():
        with pytest.raises(PrispError) as err:
            load_key(path, environ=env)
        assert "\n" not in str(err.value), name
    with pytest.raises(PrispError, match="no store key"):
        load_key(None, environ={})


def test_tokens_are_hashed_and_compared_safely():
    issued = issue_token()
    assert valid_user_id(issued.user_id) and issued.token not in issued.token_hash
    assert issued.token_hash == hash_token(issued.token)
    assert token_matches(issued.token_hash, issued.token)
    assert not token_matches(issued.token_hash, issued.token + "x")
    assert not token_matches(None, issued.token)
    assert bearer_token(f"Bearer {issued.token}") == issued.token
    assert bearer_token("Basic abc") is None and bearer_token(None) is None
    assert not valid_user_id("../etc") and not valid_user_id("u_" + "0" * 31)
    assert not valid_user_id(issued.user_id + "\n") and bearer_token(f"Bearer {issued.token}\n") is None


# ---- sealing -----------------------------------------------------------------------------------


def test_save_load_roundtrip_and_versions(store):
    user = new_user(store)
    first = save(store, user, make_weights(1))
    assert first.version == 1 and first.items == 3 and first.updates == 0
    assert_same(store.load(first), make_weights(1))
    second = save(store, user, make_weights(2), continues=1)
    assert second.version == 2 and second.updates == 1 and second.total_items == 6
    assert second.created_at == first.created_at and second.updated_at >= first.updated_at
    assert not (store.root / first.file).exists(), "the old version must be gone"
    assert_same(store.load(store.current(user, "LaMP-4")), make_weights(2))
    with pytest.raises(VersionConflictError):
        save(store, user, make_weights(3), continues=1)


def test_files_hold_no_plaintext(store):
    user = new_user(store)
    weights = make_weights(1)
    blob = (store.root / save(store, user, weights).file).read_bytes()
    plain = adapter_to_bytes(weights)
    assert blob[:8] == b"PRISPAD1" and b"lora_A" not in blob and b"__metadata__" not in blob
    some_tensor = next(iter(weights.pairs.values())).B.numpy().tobytes()
    assert some_tensor in plain and some_tensor not in blob
    assert_same(adapter_from_bytes(plain, "x"), weights)


def test_store_folders_and_files_are_private_whatever_the_umask(tmp_path, key):
    import os
    import stat

    old = os.umask(0o022)  # a common default: new folders 0755, files 0644
    try:
        with AdapterStore(tmp_path / "store", key) as opened:
            user = new_user(opened)
            record = save(opened, user, make_weights(1))
            root = opened.root  # looked at while open: SQLite's -wal and -shm files exist now
            modes = {p.relative_to(tmp_path).as_posix(): stat.S_IMODE(p.stat().st_mode)
                     for p in (root, *root.rglob("*"))}
    finally:
        os.umask(old)
    assert {"store/store.sqlite3-wal", f"store/{record.file}"} <= set(modes)
    assert all(mode & 0o077 == 0 for mode in modes.values()), modes
    assert modes[f"store/{record.file}"] == 0o600


@pytest.mark.parametrize("where", ["magic", "nonce", "ciphertext", "tag"])
def test_one_altered_byte_fails_closed(store, where):
    user = new_user(store)
    record = save(store, user, make_weights(1))
    path = store.root / record.file
    data = bytearray(path.read_bytes())
    index = {"magic": 0, "nonce": 10, "ciphertext": len(data) // 2, "tag": len(data) - 1}[where]
    data[index] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(SealError) as err:
        store.load(record)
    assert "\n" not in str(err.value) and "refusing" in str(err.value)


def test_truncated_or_missing_file_fails_closed(store):
    user = new_user(store)
    record = save(store, user, make_weights(1))
    path = store.root / record.file
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(SealError):
        store.load(record)
    path.unlink()
    with pytest.raises(SealError, match="missing"):
        store.load(record)


def test_file_moved_to_another_slot_fails_closed(store):
    alice, bob = new_user(store), new_user(store)
    a = save(store, alice, make_weights(1))
    b = save(store, bob, make_weights(2))
    (store.root / b.file).write_bytes((store.root / a.file).read_bytes())  # same version number, other user
    with pytest.raises(SealError, match="failed authentication"):
        store.load(b)
    a2 = save(store, alice, make_weights(3), task="LaMP-7")  # same user, other task and version
    (store.root / a2.file).write_bytes((store.root / a.file).read_bytes())
    with pytest.raises(SealError):
        store.load(a2)
    assert_same(store.load(a), make_weights(1))


def test_wrong_key_and_second_writer_are_refused(tmp_path, key):
    root = tmp_path / "store"
    with AdapterStore(root, key), pytest.raises(PrispError, match="in use"):
        AdapterStore(root, key)
    with pytest.raises(PrispError, match="does not open store"):
        AdapterStore(root, generate_key())
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("not a store")
    with pytest.raises(PrispError, match="non-empty directory"):
        AdapterStore(tmp_path / "other", key)


# ---- deletion and recovery ---------------------------------------------------------------------


def test_delete_user_removes_files_rows_and_bytes(store):
    alice, bob = new_user(store), new_user(store)
    save(store, alice, make_weights(1))
    save(store, alice, make_weights(2), task="LaMP-7")
    kept = save(store, bob, make_weights(3))
    assert store.delete_user(alice) and not store.delete_user(alice)
    assert not (store.root / "users" / alice).exists() and store.adapters(alice) == []
    assert not store.user_exists(alice)
    with sqlite3.connect(store.root / DB_NAME) as db:
        assert db.execute("SELECT COUNT(*) FROM users WHERE user_id = ?", (alice,)).fetchone() == (0,)
        assert db.execute("SELECT COUNT(*) FROM adapters WHERE user_id = ?", (alice,)).fetchone() == (0,)
    for path in store.root.rglob("*"):  # secure_delete + checkpoint: not even in free pages or the WAL
        if path.is_file() and path.name != "LOCK":
            assert alice.encode() not in path.read_bytes(), path
    assert_same(store.load(kept), make_weights(3))
    with pytest.raises(UnknownUserError):
        save(store, alice, make_weights(4))


def test_recover_sweeps_crash_leftovers(store):
    user = new_user(store)
    record = save(store, user, make_weights(1))
    user_dir = (store.root / record.file).parent
    (user_dir / ".tmp-deadbeef-LaMP-4.v2.adapter").write_bytes(b"partial")
    (user_dir / "LaMP-4.v9.adapter").write_bytes(b"orphan")
    (store.root / "users" / ("u_" + "f" * 32)).mkdir()  # a user deleted from the database only
    removed = store.recover()
    assert len(removed) == 3
    assert sorted(p.name for p in user_dir.iterdir()) == [Path(record.file).name]
    assert_same(store.load(record), make_weights(1))


# ---- atomicity under SIGKILL -------------------------------------------------------------------

def _save_and_hang(root: str, secret: bytes, user: str, stage: str, ready) -> None:
    """Child process: start saving version 2, stop at ``stage`` and wait to be killed."""
    from prisp import files

    def hang(*args, **kwargs):
        ready.send("ready")
        time.sleep(120)

    if stage == "before-rename":
        files.os.replace = hang  # the new version is written and fsynced, not yet renamed into place
    else:
        files.fsync_dir = hang  # renamed into place, but the row pointing at it is not committed
    store = AdapterStore(Path(root), StoreKey(secret))
    store.save(SaveRequest(user, "LaMP-4", "tiny", "prisp", items=1, continues=1), make_weights(2))
    ready.send("saved")


@pytest.mark.parametrize("stage", ["before-rename", "before-commit"])
def test_kill_during_save_keeps_previous_adapter(tmp_path, key, stage):
    root = tmp_path / "store"
    with AdapterStore(root, key) as store:
        user = new_user(store)
        save(store, user, make_weights(1))
    # fork, not spawn: a real separate process (SIGKILL, its own lock) that need not re-import torch.
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_save_and_hang, args=(str(root), key.secret, user, stage, sender))
    child.start()
    try:
        assert receiver.poll(30) and receiver.recv() == "ready"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.join(timeout=30)
    assert child.exitcode == -signal.SIGKILL
    leftovers = sorted(p.name for p in (root / "users" / user).iterdir())
    assert len(leftovers) == 2, leftovers  # the old version plus the killed save's temp or orphan file
    with AdapterStore(root, key) as store:  # the kernel released the dead writer's lock
        record = store.current(user, "LaMP-4")
        assert record.version == 1
        assert_same(store.load(record), make_weights(1))
        assert [p.name for p in (root / "users" / user).iterdir()] == [Path(record.file).name]
        assert save(store, user, make_weights(3), continues=1).version == 2


# ---- key rotation ------------------------------------------------------------------------------


def test_rotation_rewraps_data_keys_only_and_resumes(tmp_path, key, monkeypatch):
    """Killed part-way (the second user's re-wrap fails), every user still opens under the old or the new key,
    recorded per user; a rerun finishes; no adapter file is rewritten (only the 32-byte data keys are)."""
    root = tmp_path / "store"
    new_key = generate_key()
    with AdapterStore(root, key) as store:
        users = [new_user(store) for _ in range(3)]
        records = [save(store, u, make_weights(i)) for i, u in enumerate(users)]
        before = {r.file: (root / r.file).read_bytes() for r in records}
        import prisp.serve.store as store_module

        real_wrap, calls = store_module.wrap_key, []

        def flaky_wrap(*args):
            calls.append(args)
            if len(calls) == 2:
                raise OSError("disk full (simulated)")
            return real_wrap(*args)

        monkeypatch.setattr(store_module, "wrap_key", flaky_wrap)
        with pytest.raises(OSError):
            store.rotate_to(new_key)
        monkeypatch.setattr(store_module, "wrap_key", real_wrap)
    wrapped_by = dict(sqlite3.connect(root / DB_NAME).execute("SELECT user_id, wrap_key_id FROM users"))
    assert sorted(wrapped_by.values()) == sorted([new_key.key_id, key.key_id, key.key_id])  # per user
    with pytest.raises(PrispError, match="interrupted key rotation"):
        AdapterStore(root, key)  # a server refuses a half-rotated store
    with AdapterStore(root, key, rotating_to=new_key.key_id) as store:
        assert store.rotate_to(new_key) == 2  # the first user was already done
    with pytest.raises(PrispError, match="does not open"):
        AdapterStore(root, key)
    with AdapterStore(root, new_key) as store:
        for i, record in enumerate(records):
            assert (root / record.file).read_bytes() == before[record.file]  # adapters untouched
            assert_same(store.load(store.current(record.user_id, "LaMP-4")), make_weights(i))


def test_deleting_a_user_destroys_their_data_key_so_backup_copies_stay_sealed(tmp_path, key):
    root = tmp_path / "store"
    with AdapterStore(root, key) as store:
        user, other = new_user(store), new_user(store)
        record = save(store, user, make_weights(1))
        save(store, other, make_weights(2))
        backup = (root / record.file).read_bytes()  # a copy taken before the deletion (a backup, a snapshot)
        wrapped = sqlite3.connect(root / DB_NAME).execute("SELECT data_key FROM users WHERE user_id = ?",
                                                          (user,)).fetchone()[0]
        assert store.delete_user(user)
    aad = slot_aad(open_store_id(root), user, "LaMP-4", record.version)
    with pytest.raises(SealError):
        unseal(key, backup, aad, "backup")  # the store key alone never opened it
    raw = (root / DB_NAME).read_bytes() + b"".join(p.read_bytes() for p in root.glob(DB_NAME + "-*"))
    assert wrapped not in raw  # the wrapped data key is gone from the database and its WAL
    with AdapterStore(root, key) as store:
        assert_same(store.load(store.current(other, "LaMP-4")), make_weights(2))  # others unaffected


def test_a_store_from_before_envelope_encryption_is_migrated_on_open(tmp_path, key):
    """Users without a data key get one and their adapters (sealed with the store key) are re-sealed."""
    root = tmp_path / "store"
    with AdapterStore(root, key) as store:
        user = new_user(store)
        record = save(store, user, make_weights(3))
        store_id = store.store_id
    # Rewrite it the old way: the adapter sealed with the store key itself, no data key on the user.
    plain = adapter_to_bytes(make_weights(3))
    aad = slot_aad(store_id, user, "LaMP-4", record.version)
    (root / record.file).write_bytes(seal(key, plain, aad))
    db = sqlite3.connect(root / DB_NAME)
    db.execute("UPDATE users SET data_key = NULL, wrap_key_id = NULL")
    db.execute("UPDATE adapters SET key_id = ?", (key.key_id,))
    db.commit()
    db.close()
    with AdapterStore(root, key, writer=False) as reader:  # a reader serves it as it is
        assert_same(reader.load(reader.current(user, "LaMP-4")), make_weights(3))
    with AdapterStore(root, key) as store:  # a writer migrates it
        migrated = store.current(user, "LaMP-4")
        assert migrated.key_id != key.key_id
        assert_same(store.load(migrated), make_weights(3))
    with pytest.raises(SealError):
        unseal(key, (root / record.file).read_bytes(), aad, "file")  # now only the data key opens it


def open_store_id(root) -> str:
    return dict(sqlite3.connect(root / DB_NAME).execute("SELECT key, value FROM meta"))["store_id"]


# ---- cache -------------------------------------------------------------------------------------


def test_lru_cache_evicts_oldest_and_drops_users():
    cache = AdapterCache(capacity=2)
    a, b, c = ("u1", "LaMP-4", 1), ("u2", "LaMP-4", 1), ("u1", "LaMP-7", 2)
    cache.put(a, make_weights(1))
    cache.put(b, make_weights(2))
    assert cache.get(a) is not None  # a is now the most recent
    cache.put(c, make_weights(3))
    assert cache.keys() == [a, c]
    assert cache.drop_user("u1", "LaMP-7") == 1 and cache.keys() == [a]
    assert cache.drop_user("u1") == 1 and len(cache) == 0


def test_adapter_document_rejects_garbage():
    with pytest.raises(PrispError):
        adapter_from_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ", "x")
    with pytest.raises(PrispError):
        adapter_from_bytes(b"not safetensors at all", "x")
