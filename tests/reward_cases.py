"""Answer-matching cases for tests/test_reward.py: (ground_truth, response, expected_correct)."""

R = "Let me think about this carefully. First we compute the sum, then we simplify.\n"

CASES = [
    # integers, boxed
    ("7", R + r"So the answer is \boxed{7}.", True),
    ("7", R + r"\boxed{007}", True),
    ("70", R + r"\boxed{070}", True),
    ("1000", R + r"\boxed{1,000}", True),
    ("1000", R + r"\boxed{1{,}000}", True),
    ("1000", R + r"\boxed{1\,000}", True),
    ("1000", R + r"\boxed{1\!000}", True),
    ("10", R + r"\boxed{10.0}", True),
    ("10", R + r"\boxed{10.5}", False),
    ("7", R + r"\boxed{8}", False),
    ("7", R + r"\boxed{77}", False),
    ("7", R + r"\boxed{0.7}", False),
    ("12", R + r"\boxed{ 12 }", True),
    ("5", R + "\\boxed{\uff15}", True),  # full-width digit
    # wrappers and units
    ("5", R + r"\boxed{\text{5}}", True),
    ("5", R + r"\boxed{\mathrm{5}}", True),
    ("5", R + r"\boxed{5\text{ cm}}", True),
    ("5", R + r"\boxed{5 \mathrm{cm}}", True),
    ("5", R + r"\boxed{5 \text{ cm}^2}", True),
    ("30", R + r"\boxed{30^\circ}", True),
    ("30", R + r"\boxed{30^{\circ}}", True),
    ("30", R + r"\boxed{30 \text{ degrees}}", True),
    ("25", R + r"\boxed{\$25}", True),
    ("25", R + r"\boxed{25.}", True),
    ("100", R + r"\boxed{100\%}", True),
    ("12", R + r"\boxed{x = 12}", True),
    ("12", R + r"\boxed{12 \text{ ways}}", True),
    ("8", R + "Final Answer: \\text{8}", True),
    # negative numbers
    ("-3", R + r"\boxed{-3}", True),
    ("-3", R + r"\boxed{3}", False),
    ("3", R + r"\boxed{-3}", False),
    ("-2", R + "\\boxed{\u22122}", True),  # unicode minus sign
    ("-\\frac{1}{2}", R + r"\boxed{-0.5}", True),
    # box forms
    ("5", R + r"\boxed 5", True),
    ("5", R + r"$\boxed 5$", True),
    ("5", R + r"\fbox{5}", True),
    ("12", R + r"\boxed{\boxed{12}}", True),
    ("5", R + r"First \boxed{3}, but that is wrong; corrected: \boxed{5}", True),
    ("3", R + r"First \boxed{3}, but that is wrong; corrected: \boxed{5}", False),
    ("5", R + r"\boxed{5} and then \boxed{6", False),  # last box never closes
    ("5", R + r"\boxed{5", False),
    ("5", R + r"\boxed{}", False),
    # fractions, decimals, radicals, expressions (math-verify)
    ("\\frac{1}{2}", R + r"\boxed{\frac{1}{2}}", True),
    ("\\frac{1}{2}", R + r"\boxed{0.5}", True),
    ("\\frac{1}{2}", R + r"\boxed{1/2}", True),
    ("0.5", R + r"\boxed{\frac{1}{2}}", True),
    ("0.5", R + r"\boxed{\dfrac{1}{2}}", True),
    ("0.5", R + r"\boxed{\frac{1}{3}}", False),
    ("3.75", R + r"\boxed{\frac{15}{4}}", True),
    ("7", R + r"\boxed{\frac{14}{2}}", True),
    ("\\frac{\\sqrt{2}}{2}", R + r"\boxed{\frac{1}{\sqrt{2}}}", True),
    ("2\\sqrt{3}", R + r"\boxed{\sqrt{12}}", True),
    ("2\\sqrt{3}", R + r"\boxed{3\sqrt{2}}", False),
    ("\\frac{\\pi}{2}", R + r"\boxed{\frac{\pi}{2}}", True),
    ("\\pi", R + r"\boxed{2\pi}", False),
    ("x^2+1", R + r"\boxed{1+x^2}", True),
    ("(1,2)", R + r"\boxed{(1, 2)}", True),
    ("(1,2)", R + r"\boxed{(2, 1)}", False),
    ("\\frac{1}{2}", R + "Answer: \\frac{1}{2}", True),
    # answer lines
    ("42", R + "Answer: 42", True),
    ("42", R + "Final answer: $42$.", True),
    ("42", R + "**Final Answer:** 42", True),
    ("42", R + "ANSWER: 042", True),
    ("42", "Answer: 41\nWait, let me recheck.\nAnswer: 42", True),
    ("41", "Answer: 41\nWait, let me recheck.\nAnswer: 42", False),
    # bold
    ("42", R + "So the result is **42**.", True),
    # the answer phrase inside a bold span, or bold markers around an answer line (no \boxed{})
    ("42", "**Final Answer: 42**", True),
    ("42", "**Answer: 42**", True),
    ("42", "**Final answer:** **42**", True),
    ("42", "**The final answer is 42.**", True),
    ("42", "Step 3 gives **17**. **The final answer is: 42**", True),
    ("42", "**The answer is 42**", True),
    ("42", "**The final answer is 41.**", False),
    ("42", "**Final Answer**\n\n$42$", True),
    ("42", "**Final Answer**\n41", False),
    ("42", "**Answer: 42**\nWait, that is wrong.\n**Final Answer: 41**", False),
    ("42", "**Step 1**: compute. The result is **41**.", False),
    # no recognisable answer
    ("42", R + "The answer is 42.", False),
    ("5", "", False),
    # noise around a valid answer
    ("5", R + "\\boxed{5}\x00\x07", True),
    ("5", "\U0001f642 " + R + "\\boxed{5} \U0001f389", True),
]
