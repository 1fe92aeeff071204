"""The online half of the paper's system: the policy writes reasoning and Python, a sandboxed tool
answers, answers are graded, and graded trajectories become training rows.

    prompts → rollout (+ sandbox) → grade → pairs → trainers → iterate

The sandbox and the grader never import torch.
"""
