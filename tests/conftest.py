"""Test order: the fast unit tests first, then the tests that start a real ComfyUI server and a browser, so a broken
unit shows up within seconds."""


def pytest_collection_modifyitems(session, config, items):
    def slow(item) -> int:
        path = str(item.path).replace("\\", "/")
        if "/tests/integration/test_frontend" in path:
            return 2
        return 1 if "/tests/integration/" in path else 0

    items.sort(key=slow)  # stable: the order within each group is kept
