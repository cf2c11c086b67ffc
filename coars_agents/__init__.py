"""CoARS agents: LLM policies, rollouts, baselines and the self-distilled trainer."""
