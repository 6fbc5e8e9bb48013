import pytest

from vivarium.config import DEFAULT_WARM_POOL, ConfigError, parse_sizes


def test_pool_sizes_are_read_per_template() -> None:
    assert parse_sizes("WARM_POOL", " base=2, code-interpreter-v1=0 ,") == (
        ("base", 2), ("code-interpreter-v1", 0))  # fmt: skip
    assert parse_sizes("WARM_POOL", "") == ()
    assert DEFAULT_WARM_POOL == (("base", 2), ("code-interpreter-v1", 1))


@pytest.mark.parametrize("raw", ["base", "base=", "=2", "base=-1", "base=two", "base=2;x=1"])
def test_a_malformed_pool_size_says_how_to_write_it(raw: str) -> None:
    with pytest.raises(ConfigError, match="is not TEMPLATE=COUNT") as refused:
        parse_sizes("WARM_POOL", raw)
    assert "base=2,code-interpreter-v1=1" in refused.value.hint
