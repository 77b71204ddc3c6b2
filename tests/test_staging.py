"""rpg.staging on its own, no processes: where directive paths lead, the sandbox side kept
inside its sandbox (``..``, absolute, a symlink out: refused), ``non_fatal``, and the local
copy/link/move on real files in tmp_path."""

from __future__ import annotations

import hashlib
import os

import pytest
import structlog

from rpg.log import get_logger
from rpg.staging import (
    StagingError,
    carry_out,
    client_directives,
    confine,
    is_client,
    label,
    make_sandbox,
    other_side,
    sandbox_side,
    stage,
)

UNIT, PILOT = "/p/unit.1", "/p"


def d(source, target, action="copy", flags=("create_parents",)):
    return {"source": source, "target": target, "action": action, "flags": list(flags)}


@pytest.fixture
def sandboxes(tmp_path):
    """(unit sandbox, pilot sandbox, a directory outside both), real directories."""
    pilot = tmp_path / "pilot"
    unit = pilot / "unit.1"
    outside = tmp_path / "outside"
    make_sandbox(str(unit))
    outside.mkdir()
    return unit, pilot, outside


# -- paths -------------------------------------------------------------------------------------

@pytest.mark.parametrize("path, expect", [
    ("in.txt", ("/p/unit.1/in.txt", UNIT)),
    ("sub/./in.txt", ("/p/unit.1/sub/in.txt", UNIT)),
    ("a/../in.txt", ("/p/unit.1/in.txt", UNIT)),
    ("unit://in.txt", ("/p/unit.1/in.txt", UNIT)),
    ("pilot://shared/x", ("/p/shared/x", PILOT)),
    (".", ("/p/unit.1", UNIT)),
])
def test_sandbox_side_resolves_in_its_sandbox(path, expect):
    assert sandbox_side(path, UNIT, PILOT) == expect


@pytest.mark.parametrize("path", [
    "../x", "a/../../x", "unit://../x", "pilot://../etc/passwd", "pilot://a/../../x",
    "/etc/passwd", "unit:///etc/passwd", "client:///tmp/x", "ftp://host/x",
])
def test_sandbox_side_refuses_what_leaves_it(path):
    with pytest.raises(StagingError, match="escapes its sandbox|must be relative"):
        sandbox_side(path, UNIT, PILOT)


def test_other_side(tmp_path):
    assert other_side("/data/x.bin", UNIT, PILOT) == "/data/x.bin"
    assert other_side("client:///data/x", UNIT, PILOT) == "/data/x"
    assert other_side("pilot://shared/x", UNIT, PILOT) == "/p/shared/x"
    assert other_side("rel/x", UNIT, PILOT) == "/p/unit.1/rel/x"
    assert other_side("unit://x", UNIT, PILOT) == "/p/unit.1/x"


def test_directive_helpers():
    desc = {"input_staging": [d("client:///a", "a"), d("/b", "b")],
            "output_staging": [d("c", "client:///c"), d("e", "/e")]}
    assert [x["source"] for x in client_directives(desc, "in")] == ["client:///a"]
    assert [x["target"] for x in client_directives(desc, "out")] == ["client:///c"]
    assert client_directives({"input_staging": [], "output_staging": []}, "in") == []
    assert is_client("client:///x") and not is_client("/x") and not is_client("pilot://x")
    assert label(d("/b", "b", "move")) == "move /b -> b"


# -- confinement through symlinks (real files) ---------------------------------------------------

def test_confine_follows_symlinks(sandboxes):
    unit, _pilot, outside = sandboxes
    (unit / "inside.txt").write_text("x")
    (unit / "to_inside").symlink_to(unit / "inside.txt")
    (unit / "to_outside").symlink_to(outside / "secret")  # dangling: the target is not there
    (unit / "dir_out").symlink_to(outside)
    confine(str(unit / "inside.txt"), str(unit), "staging source")
    confine(str(unit / "to_inside"), str(unit), "staging source")
    confine(str(unit / "not_yet"), str(unit), "staging target")  # judged by its parent
    confine(str(unit), str(unit), "staging target")
    for bad in ("to_outside", "dir_out", "dir_out/new_file"):
        with pytest.raises(StagingError, match="escapes its sandbox"):
            confine(str(unit / bad), str(unit), "staging target")


def test_confine_is_not_fooled_by_a_common_prefix(tmp_path):
    root = tmp_path / "sb"
    sibling = tmp_path / "sb-other"  # starts with the root's name, but is not inside it
    root.mkdir()
    sibling.mkdir()
    (root / "link").symlink_to(sibling)
    with pytest.raises(StagingError, match="escapes its sandbox"):
        confine(str(root / "link"), str(root), "staging source")


def test_stage_in_refuses_a_target_link_out_and_leaves_the_outside_alone(sandboxes, tmp_path):
    unit, pilot, outside = sandboxes
    victim = outside / "victim.txt"
    victim.write_text("keep me\n")
    (unit / "in.txt").symlink_to(victim)
    src = tmp_path / "payload.txt"
    src.write_text("overwrite\n")
    with pytest.raises(StagingError, match="staging target .* escapes its sandbox"):
        stage(d(str(src), "in.txt"), "in", str(unit), str(pilot))
    assert victim.read_text() == "keep me\n"


def test_stage_out_refuses_a_source_link_out(sandboxes, tmp_path):
    unit, pilot, outside = sandboxes
    (outside / "secret").write_text("not yours\n")
    (unit / "escape").symlink_to(outside / "secret")
    with pytest.raises(StagingError, match="staging source .* escapes its sandbox"):
        stage(d("escape", str(tmp_path / "got")), "out", str(unit), str(pilot))
    assert not (tmp_path / "got").exists()


def test_stage_refuses_a_parent_directory_link_out(sandboxes, tmp_path):
    unit, pilot, outside = sandboxes
    (unit / "sub").symlink_to(outside)
    src = tmp_path / "payload.txt"
    src.write_text("x")
    with pytest.raises(StagingError, match="escapes its sandbox"):
        stage(d(str(src), "sub/x.txt"), "in", str(unit), str(pilot))
    assert os.listdir(outside) == []


def test_stage_refuses_escaping_paths_whatever_the_description_let_through(sandboxes, tmp_path):
    unit, pilot, outside = sandboxes
    src = tmp_path / "payload.txt"
    src.write_text("x")
    for target in ("../../outside/x", str(outside / "x")):
        with pytest.raises(StagingError, match="escapes its sandbox"):
            stage(d(str(src), target), "in", str(unit), str(pilot))
    assert os.listdir(outside) == []


# -- local operations ----------------------------------------------------------------------------

def test_copy_in_and_out(sandboxes, tmp_path):
    unit, pilot, _ = sandboxes
    src = tmp_path / "data.bin"
    src.write_bytes(b"\x00" * 5000)
    got = stage(d(str(src), "deep/er/data.bin"), "in", str(unit), str(pilot))
    assert got["bytes"] == 5000 and got["seconds"] >= 0
    assert (unit / "deep/er/data.bin").read_bytes() == src.read_bytes()
    assert src.exists()
    out = tmp_path / "results" / "back.bin"
    got = stage(d("deep/er/data.bin", str(out)), "out", str(unit), str(pilot))
    assert got["bytes"] == 5000 and out.read_bytes() == src.read_bytes()


def test_copy_to_the_pilot_sandbox(sandboxes, tmp_path):
    unit, pilot, _ = sandboxes
    src = tmp_path / "shared.txt"
    src.write_text("for all units\n")
    stage(d(str(src), "pilot://shared.txt"), "in", str(unit), str(pilot))
    assert (pilot / "shared.txt").read_text() == "for all units\n"


def test_without_create_parents_a_missing_directory_fails(sandboxes, tmp_path):
    unit, pilot, _ = sandboxes
    src = tmp_path / "x.txt"
    src.write_text("x")
    with pytest.raises(StagingError, match="No such file or directory"):
        stage(d(str(src), "no/such/dir/x.txt", flags=()), "in", str(unit), str(pilot))


def test_a_missing_source_fails(sandboxes, tmp_path):
    unit, pilot, _ = sandboxes
    with pytest.raises(StagingError, match="No such file or directory"):
        stage(d(str(tmp_path / "nope"), "x"), "in", str(unit), str(pilot))


def test_directories_need_recursive(sandboxes, tmp_path):
    unit, pilot, _ = sandboxes
    tree = tmp_path / "tree"
    (tree / "a" / "b").mkdir(parents=True)
    (tree / "top.txt").write_text("12345")
    (tree / "a" / "b" / "leaf.txt").write_text("123")
    with pytest.raises(StagingError, match="source is a directory; add the 'recursive' flag"):
        stage(d(str(tree), "tree"), "in", str(unit), str(pilot))
    got = stage(d(str(tree), "tree", flags=("recursive",)), "in", str(unit), str(pilot))
    assert got["bytes"] == 8
    assert (unit / "tree" / "a" / "b" / "leaf.txt").read_text() == "123"
    back = tmp_path / "back"
    got = stage(d("tree", str(back), flags=("recursive",)), "out", str(unit), str(pilot))
    assert got["bytes"] == 8 and (back / "top.txt").read_text() == "12345"


def test_link(sandboxes, tmp_path):
    unit, pilot, _ = sandboxes
    src = tmp_path / "big.bin"
    src.write_bytes(b"1" * 100)
    (unit / "big.bin").write_text("an older file, replaced by the link")
    got = stage(d(str(src), "big.bin", "link"), "in", str(unit), str(pilot))
    assert got["bytes"] == 0
    assert os.readlink(unit / "big.bin") == str(src)
    assert (unit / "big.bin").read_bytes() == b"1" * 100


def test_move(sandboxes, tmp_path):
    unit, pilot, _ = sandboxes
    src = tmp_path / "once.txt"
    src.write_text("only one copy\n")
    got = stage(d(str(src), "once.txt", "move"), "in", str(unit), str(pilot))
    assert got["bytes"] == 14 and not src.exists()
    assert (unit / "once.txt").read_text() == "only one copy\n"
    out = tmp_path / "out" / "once.txt"
    stage(d("once.txt", str(out), "move"), "out", str(unit), str(pilot))
    assert not (unit / "once.txt").exists() and out.read_text() == "only one copy\n"


def test_make_sandbox_accepts_an_existing_one(tmp_path):
    make_sandbox(str(tmp_path / "a" / "b"))
    make_sandbox(str(tmp_path / "a" / "b"))
    assert (tmp_path / "a" / "b").is_dir()


# -- non_fatal, decided in one place -------------------------------------------------------------

def test_carry_out_skips_a_failed_non_fatal_directive_and_stops_at_a_fatal_one(sandboxes,
                                                                               tmp_path):
    unit, pilot, _ = sandboxes
    ok = tmp_path / "ok.txt"
    ok.write_text("fine")
    directives = [
        d(str(tmp_path / "optional"), "a", flags=("non_fatal",)),
        d(str(ok), "ok.txt"),
        d(str(tmp_path / "required"), "b"),
        d(str(ok), "never.txt"),
    ]
    with structlog.testing.capture_logs() as logs, \
            pytest.raises(StagingError) as err:
        carry_out(directives, lambda x: stage(x, "in", str(unit), str(pilot)),
                  "staging in", get_logger("test"), unit="unit.1")
    # The fatal one is named, with its words; the one after it is not tried.
    assert str(err.value) == (f"staging in: copy {tmp_path}/required -> b: "
                              f"No such file or directory")
    assert (unit / "ok.txt").read_text() == "fine"
    assert not (unit / "never.txt").exists()
    skipped = [e for e in logs if e["event"] == "staging_failed_non_fatal"]
    assert len(skipped) == 1
    assert skipped[0]["directive"] == f"copy {tmp_path}/optional -> a"
    assert skipped[0]["unit"] == "unit.1" and skipped[0]["log_level"] == "warning"


def test_carry_out_turns_any_failure_into_a_staging_error():
    def refuse(_d):
        raise ValueError("not today")

    with pytest.raises(StagingError, match=r"^client staging out: copy x -> client:///y: "
                                           r"not today$"):
        carry_out([d("x", "client:///y")], refuse, "client staging out", get_logger("test"))
    carry_out([d("x", "client:///y", flags=("non_fatal",))], refuse, "client staging out",
              get_logger("test"))


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom", "/dev/null"])
def test_a_device_is_refused_as_a_source(tmp_path, device):
    """A copy from /dev/zero used to run until the disk was full (20 GB in a minute)."""
    from rpg.staging import local

    with pytest.raises(StagingError, match="character device"):
        local.copy(device, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


# -- client:// through a hub service (rpg/staging/relay.py), both sides with real files ----------

def _hub_call(sandbox):
    from rpg.staging import relay

    fns = {"upload": relay.write_chunk, "upload_done": relay.finish_upload,
           "download": relay.read_chunk}
    return lambda method, *args: fns[method](sandbox, *args)


def test_relay_two_uploads_of_the_same_content_never_meet(tmp_path):
    from rpg.staging import relay

    sandbox = str(tmp_path / "s")
    data = os.urandom(2 * relay.CHUNK + 5)
    name = hashlib.sha256(data).hexdigest()
    a, b = "a" * 16, "b" * 16
    assert relay.write_chunk(sandbox, name, a, 0, b"") == 0
    assert relay.write_chunk(sandbox, name, a, 0, data[:relay.CHUNK]) == relay.CHUNK
    assert relay.write_chunk(sandbox, name, b, 0, b"") == 0  # another upload begins
    # the first goes on undisturbed; a chunk sent again after a lost reply is taken as held
    assert relay.write_chunk(sandbox, name, a, 0, data[:relay.CHUNK]) == relay.CHUNK
    c = relay.CHUNK
    assert relay.write_chunk(sandbox, name, a, c, data[c:2 * c]) == 2 * c
    assert relay.write_chunk(sandbox, name, a, 2 * c, data[2 * c:]) == len(data)
    path = relay.finish_upload(sandbox, name, a)
    assert open(path, "rb").read() == data
    # the second finds the content there already
    assert relay.write_chunk(sandbox, name, b, 0, b"") == len(data)
    assert relay.finish_upload(sandbox, name, b) == path
    with pytest.raises(relay.RelayError, match="transfer id"):
        relay.write_chunk(sandbox, name, "../x", 0, b"")


def test_relay_a_corrupted_upload_is_refused_and_dropped(tmp_path):
    from rpg.staging import relay

    sandbox = str(tmp_path / "s")
    name = hashlib.sha256(b"right").hexdigest()
    relay.write_chunk(sandbox, name, "c" * 16, 0, b"wrong")
    with pytest.raises(relay.RelayError, match="checksum mismatch"):
        relay.finish_upload(sandbox, name, "c" * 16)
    assert not os.listdir(os.path.join(sandbox, "client", "in"))


def test_relay_download_in_chunks_with_parents_made_and_directories_refused(tmp_path):
    from rpg.staging import relay

    sandbox = str(tmp_path / "s")
    data = os.urandom(relay.CHUNK * 2 + 3)
    want = str(tmp_path / "client" / "deep" / "out.bin")
    with open(relay.hub_out_path(sandbox, want), "wb") as fh:
        fh.write(data)
    call = _hub_call(sandbox)
    first = call("download", want, "d" * 16, 0)
    again = call("download", want, "d" * 16, 0)  # asked again after a lost reply
    assert first["data"] == again["data"] == data[:relay.CHUNK] and "eof" not in first
    relay.download(call, want)  # makes client/deep/, checks the sha256
    assert open(want, "rb").read() == data
    os.makedirs(relay.hub_out_path(sandbox, "/x/dir"))
    with pytest.raises(relay.RelayError, match="directory"):
        call("download", "/x/dir", "e" * 16, 0)
    with pytest.raises(relay.RelayError, match="no output"):
        call("download", "/nothing/here", "f" * 16, 0)
