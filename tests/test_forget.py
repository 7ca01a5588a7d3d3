import pytest

from personalize.errors import UnknownUserError
from personalize.naming import user_dir

MARKER = "zebracorn-unique-marker"


def _files_containing(root, needle: bytes) -> list[str]:
    found = []
    for path in root.rglob("*"):
        if path.is_file() and needle in path.read_bytes():
            found.append(str(path))
    return found


def test_forget_removes_rows_collection_and_files(client, home):
    client.add_items("victim/../x", [{"id": str(i), "text": f"{MARKER} item {i}"} for i in range(20)])
    client.add_items("bystander", [{"id": "1", "text": "unrelated text"}])
    folder = user_dir(client.settings.users_dir, "victim/../x")
    folder.mkdir(parents=True)
    (folder / "note.txt").write_text(MARKER)
    report = client.forget("victim/../x")
    assert report.items == 20 and report.collection and str(folder) in report.files
    with pytest.raises(UnknownUserError):
        client.user("victim/../x")
    with pytest.raises(UnknownUserError):
        client.retrieve("victim/../x", MARKER)
    assert client.vectors.count("victim/../x") == 0
    assert client.retrieve("bystander", MARKER, k=5)[0].item.text == "unrelated text"
    client.close()  # flush Chroma and SQLite before reading the bytes on disk
    assert _files_containing(home, MARKER.encode()) == []


def test_forget_unknown_user_raises(client):
    with pytest.raises(UnknownUserError):
        client.forget("nobody")
