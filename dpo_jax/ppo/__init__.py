"""PPO for RLHF (the baseline DPO is compared against): math in ``core``, the jitted update in
``step``, reward sources in ``rewards``, prompts in ``data``, the task's Run in ``run``."""
