"""The simulated skill's LLM-like answer: its size follows ``answer_bytes``, the setting round-trips
through the cluster file and the scenario, and a bad value is refused naming the key."""

from __future__ import annotations

import tomllib

import orjson
import pytest

from edge_server.config import ConfigError, SkillConfig, parse_cluster
from edge_server.config_dump import dump_cluster
from edge_server.skill import SimulatedSkill
from workbench.spec.parts import ScenarioError, SkillSpec
from workbench.spec.scenario import Scenario


@pytest.mark.parametrize("size", [512, 2048, 8192])
async def test_answer_is_about_the_configured_size(size: int) -> None:
    skill = SimulatedSkill(SkillConfig(median_ms=0, p99_ms=0, answer_bytes=size), seed=1)
    answer = await skill.invoke({"text": "a review"})
    body = orjson.dumps(answer)
    assert abs(len(body) - size) < 0.1 * size, len(body)
    message = answer["completion"]["choices"][0]["message"]
    assert message["role"] == "assistant" and message["content"]
    assert answer["completion"]["usage"]["completion_tokens"] > 0


async def test_default_answer_is_the_bare_rating() -> None:
    answer = await SimulatedSkill(SkillConfig(median_ms=0, p99_ms=0)).invoke({"text": "x"})
    assert set(answer) == {"rating", "latency_ms"}


def test_answer_bytes_round_trips_and_bad_values_name_the_key() -> None:
    raw = tomllib.loads('[cluster]\nsecret = "' + "s" * 32 + '"\n[[regions]]\nname = "eu"\n[[regions.nodes]]\n'
                        'id = "eu-1"\nhost = "127.0.0.1"\nport = 9000\n[[limits]]\npattern = "*"\nrate = 1.0\n'
                        'burst = 1.0\n[skill]\nanswer_bytes = 2048\n')
    parsed = parse_cluster(raw, source="c.toml")
    assert parsed.skill.answer_bytes == 2048
    assert parse_cluster(tomllib.loads(dump_cluster(parsed)), source="c.toml") == parsed
    raw["skill"]["answer_bytes"] = -1
    with pytest.raises(ConfigError, match=r"skill\.answer_bytes"):
        parse_cluster(raw, source="c.toml")
    scenario = Scenario.build(skill_answer_bytes=2048)
    ports = {n: 10000 + i for i, n in enumerate(scenario.topology.node_ids)}
    assert scenario.cluster_config(ports, router_port=9999, secret="s" * 32,
                                   audit_dir="audit").skill.answer_bytes == 2048
    with pytest.raises(ScenarioError, match="answer_bytes"):
        SkillSpec(answer_bytes=-5)
