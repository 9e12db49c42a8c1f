"""EideticNet: mask freezing of neurons owned by earlier tasks."""
