"""The paper's derivations (appendix C and Sec. 3), checked numerically in float64.

Property-based tests (hypothesis + pytest) on exact toy problems (`theory.toys`): a discrete
contextual bandit and a tiny autoregressive policy whose sequences can all be enumerated. Every
formula under test is imported from `maxent_rlhf.objectives`; the toys only build problems and take
exact expectations by enumeration. Run with `python -m pytest -q theory` (set CI=1 for the
derandomised `ci` hypothesis profile).
"""
