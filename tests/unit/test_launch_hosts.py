"""Host lists and hostfiles: both forms, and errors that point at the offending entry or line."""

import pytest

from hvdclip.launch import Host, parse_host_list, parse_hostfile, read_hostfile


def test_host_list_parses_names_and_slots():
    assert parse_host_list("node1:4,10.0.0.2:2") == (Host("node1", 4), Host("10.0.0.2", 2))


def test_hostfile_accepts_both_forms_comments_and_blank_lines():
    text = "# two nodes\nnode1 slots=4\n\n  node2:2   # the small one\nnode3 slots = 1\n"
    assert parse_hostfile(text) == (Host("node1", 4), Host("node2", 2), Host("node3", 1))


def test_both_forms_describe_the_same_hosts():
    hosts = parse_host_list("a:3,b:1,c:8")
    openmpi = "\n".join(f"{h.name} slots={h.slots}" for h in hosts)
    assert parse_hostfile(openmpi) == hosts
    assert parse_hostfile("\n".join(map(str, hosts))) == hosts
    assert parse_host_list(",".join(map(str, hosts))) == hosts


@pytest.mark.parametrize("text", ["node1", "node1:0", "node1:x", "node1:2:3", "node1:2,,node2:2", "", "node1 slots=2"])
def test_malformed_host_list_entry_is_named(text):
    with pytest.raises(ValueError, match=r"`-H` entries must be `host:N` with N >= 1\. Received: -H=") as err:
        parse_host_list(text)
    assert text in str(err.value)


@pytest.mark.parametrize("bad", ["node3", "node3 slots=0", "node3 slots=two", "node3 cpus=4", "node3:4 extra"])
def test_malformed_hostfile_line_gives_its_number(bad):
    text = f"node1 slots=2\n# comment\n{bad}\nnode4:1\n"
    with pytest.raises(ValueError) as err:
        parse_hostfile(text, source="hosts.txt")
    assert str(err.value) == (
        f"`--hostfile` lines must be `host slots=N` or `host:N` with N >= 1. Received: hosts.txt:3: {bad!r}"
    )


def test_repeated_host_is_refused_with_both_places():
    with pytest.raises(ValueError, match=r"listed once.*`node1` at hosts.txt:1 and at hosts.txt:3"):
        parse_hostfile("node1 slots=2\nnode2:2\nnode1:1\n", source="hosts.txt")
    with pytest.raises(ValueError, match=r"`a` at -H entry 1 and at -H entry 2"):
        parse_host_list("a:1,a:1")


def test_hostfile_without_hosts_is_refused():
    with pytest.raises(ValueError, match=r"`--hostfile` must name at least one host\. Received: empty.txt"):
        parse_hostfile("# nothing yet\n\n", source="empty.txt")


def test_read_hostfile_reads_a_file_and_names_a_missing_one(tmp_path):
    path = tmp_path / "hosts"
    path.write_text("node1 slots=2\nnode2:2\n")
    assert read_hostfile(path) == (Host("node1", 2), Host("node2", 2))
    missing = tmp_path / "missing"
    with pytest.raises(ValueError, match=rf"`--hostfile` must be a readable file .*Received: --hostfile={missing}$"):
        read_hostfile(missing)
