"""The shipped example data set: educational texts in Chinese and English with concept / definition /
methodology regions, authored once in tag_based form and written in all three formats.

The guide's own examples are among them (``guide-*`` ids); in ``guide-position`` the concept region is
characters [100, 200), as in the guide's position_based example.
"""

from __future__ import annotations

import os
from pathlib import Path

from mrloss.formats import FORMATS, convert

# where the built-in configs read the example data (relative to the run's working directory); `mrloss train` with
# ``data.write_examples`` writes a missing file there, and nowhere else
EXAMPLE_DIRECTORY = Path("examples/sft/multi_region/data")

_C = '<LEARN weight="2.0" type="concept">'
_D = '<LEARN weight="1.5" type="definition">'
_M = '<LEARN weight="1.2" type="methodology">'
_E = "</LEARN>"

EXAMPLES: list[dict] = [
    # --- the guide's own examples -------------------------------------------------------------------------
    {
        "id": "guide-tag",
        "language": "zh",
        "default_weight": 0.0,
        "text": '\n    这是普通文本。\n    <LEARN weight="2.0" type="concept">\n    这是需要学习的重要概念。\n    </LEARN>\n    ',
    },
    {"id": "guide-structured", "language": "zh", "default_weight": 0.0, "text": f"介绍部分{_C}重要概念{_E}"},
    {
        "id": "guide-position",
        "language": "zh",
        "default_weight": 0.0,
        "text": "这是一段关于机器学习基础的入门课程讲义。在开始之前，我们先简单回顾线性代数和概率论中的几个记号：向量用粗体小写字母表示，"
        "矩阵用大写字母表示，数学期望记为E。本节的重点是理解模型为什么能够从数据中学习。"
        f"{_C}泛化能力是指模型在训练时从未见过的新数据上依然能够做出准确可靠的预测的能力。它衡量的并不是模型记住了多少训练样本，"
        f"而是模型是否真正抓住了数据背后的规律。泛化误差通常用独立测试集上的平均误差来近似估计。{_E}"
        "下一节我们将讨论过拟合与欠拟合，并用一个多项式回归的例子说明二者的区别。",
    },
    # --- Chinese --------------------------------------------------------------------------------------------
    {
        "id": "zh-gradient-descent",
        "language": "zh",
        "default_weight": 0.0,
        "text": "问题：什么是梯度下降？请说明它的基本步骤。\n回答："
        f"{_D}梯度下降是一种通过沿损失函数负梯度方向反复更新参数、从而逐步减小损失的迭代优化算法。{_E}"
        f"{_M}具体步骤如下：第一步，随机初始化参数；第二步，在当前参数处计算损失函数的梯度；"
        f"第三步，按照“参数 ← 参数 − 学习率 × 梯度”更新参数；第四步，重复第二、三步，直到损失不再明显下降。{_E}"
        f"{_C}学习率决定了每一步走多远：太大会在最优点附近来回震荡甚至发散，太小则收敛缓慢。{_E}",
    },
    {
        "id": "zh-photosynthesis",
        "language": "zh",
        "default_weight": 0.0,
        "text": "生物课笔记 · 第三章 植物的营养\n"
        f"{_D}光合作用是绿色植物利用光能，把二氧化碳和水合成储存能量的有机物，并释放氧气的过程。{_E}"
        "它主要发生在叶肉细胞的叶绿体中。\n"
        f"{_C}光合作用分为光反应和暗反应两个阶段：光反应在类囊体薄膜上进行，把光能转化为ATP和NADPH中的化学能；"
        f"暗反应在叶绿体基质中进行，利用这些能量把二氧化碳固定并还原成糖类。{_E}\n"
        "课后思考：为什么阴天时大棚蔬菜的产量会下降？",
    },
    {
        "id": "zh-newton-second-law",
        "language": "zh",
        "default_weight": 0.0,
        "text": "物理 · 力与运动\n"
        f"{_D}牛顿第二定律：物体加速度的大小与所受合外力成正比，与物体的质量成反比，加速度的方向与合外力的方向相同，即 F = ma。{_E}\n"
        f"{_M}解题方法：先确定研究对象，再进行受力分析并画出受力图，然后建立坐标系把各力正交分解，"
        f"最后在每个坐标轴上分别列出 F合 = ma 的方程求解。{_E}\n"
        "例题：质量为2 kg的木块在水平拉力10 N作用下运动，摩擦力为4 N，求加速度。答案：a = (10 − 4) / 2 = 3 m/s²。",
    },
    {
        "id": "zh-supply-demand",
        "language": "zh",
        "default_weight": 0.0,
        "text": "经济学原理 第二讲\n在自由市场中，价格并不是由某一个人决定的。"
        f"{_C}当某种商品的需求量大于供给量时，价格倾向于上升；当供给量大于需求量时，价格倾向于下降；"
        f"价格最终会趋向于使供给量等于需求量的均衡价格。{_E}"
        f"{_D}均衡价格是指市场上供给量与需求量恰好相等时的价格。{_E}"
        "政府设定的价格上限如果低于均衡价格，就会造成短缺。",
    },
    {
        "id": "zh-recursion",
        "language": "zh",
        "default_weight": 0.0,
        "text": "编程入门：递归\n"
        f"{_D}递归是指函数在自身的定义中直接或间接地调用自身。{_E}"
        f"{_M}编写递归函数时要先写出基本情形，也就是不再递归、直接返回结果的条件；"
        f"再写出递归情形，并保证每次调用都让问题规模变小，最终一定能到达基本情形。{_E}\n"
        "例如计算阶乘：def fact(n): return 1 if n == 0 else n * fact(n - 1)",
    },
    {
        "id": "zh-pythagorean",
        "language": "zh",
        "default_weight": 0.0,
        "text": "数学 · 勾股定理\n"
        f"{_C}在直角三角形中，两条直角边的平方和等于斜边的平方，即 a² + b² = c²。{_E}"
        "我国古代的《周髀算经》中就记载了“勾三股四弦五”的特例。\n"
        f"{_M}证明思路：把四个全等的直角三角形拼成一个大正方形，用两种方法计算大正方形的面积，"
        f"令两个结果相等并化简，即可得到 a² + b² = c²。{_E}",
    },
    {
        "id": "zh-chemical-equilibrium",
        "language": "zh",
        "default_weight": 0.0,
        "text": "化学平衡\n"
        f"{_D}化学平衡状态是指在一定条件下的可逆反应中，正反应速率与逆反应速率相等，"
        f"反应混合物中各组分的浓度保持不变的状态。{_E}"
        f"<LEARN weight='2.5' type='concept'>勒夏特列原理：如果改变影响平衡的一个条件，"
        f"平衡就会向着能够减弱这种改变的方向移动。{_E}"
        "例如，增大反应物浓度，平衡向正反应方向移动。",
    },
    {
        "id": "zh-scientific-method",
        "language": "zh",
        "default_weight": 0.0,
        "text": "科学探究的一般过程\n"
        f"{_M}科学探究通常包括六个环节：提出问题、作出假设、制定计划、实施计划、得出结论、表达和交流。"
        f"{_C}其中设计对照实验时必须控制单一变量，{_E}"
        f"这样才能确定实验结果的差异是由所研究的因素引起的。{_E}\n"
        "小明想知道光照是否影响种子萌发，他应该如何设计实验？",
    },
    {
        "id": "zh-tang-dynasty",
        "language": "zh",
        "default_weight": 0.0,
        "text": "历史 · 隋唐时期\n唐朝是中国历史上经济繁荣、文化昌盛的朝代之一。"
        f"{_D}科举制是通过分科考试选拔官员的制度，创立于隋朝，在唐朝得到完善。{_E}"
        f"{_C}科举制打破了世家大族对官职的垄断，使出身普通的读书人也有机会进入仕途，扩大了统治基础。{_E}"
        "唐太宗时期的“贞观之治”也与选贤任能密切相关。",
    },
    {
        "id": "zh-overfitting",
        "language": "zh",
        "default_weight": 0.0,
        "text": "用户：我的模型训练集准确率99%，测试集只有60%，这是怎么回事？\n助手："
        f"{_D}这种现象叫作过拟合：模型把训练数据中的噪声和偶然特征也记住了，因而在新数据上表现很差。{_E}"
        f"{_M}常用的解决办法有：收集更多数据；使用数据增强；加入L2正则化或Dropout；"
        f"降低模型复杂度；用验证集做早停。{_E}"
        "建议先画出训练和验证损失曲线，确认两者从哪一轮开始分开。",
    },
    {
        "id": "zh-binary-search",
        "language": "zh",
        "default_weight": 0.0,
        "text": "算法课：二分查找\n"
        f"{_C}二分查找只适用于有序数组，每次比较都能把搜索区间缩小一半，因此时间复杂度是 O(log n)。{_E}"
        f"{_M}实现时维护左右边界 lo 和 hi：取中点 mid = (lo + hi) // 2，若目标值更大则令 lo = mid + 1，"
        f"否则令 hi = mid，循环直到 lo == hi。{_E}",
    },
    # --- English --------------------------------------------------------------------------------------------
    {
        "id": "en-gradient-descent",
        "language": "en",
        "default_weight": 0.0,
        "text": "Question: What is gradient descent, and how do you choose the learning rate?\nAnswer: "
        f"{_D}Gradient descent is an iterative optimization algorithm that repeatedly moves the parameters "
        f"a small step in the direction of the negative gradient of the loss.{_E} "
        f"{_M}To choose the learning rate, start with a value such as 1e-3, run a short training job, and "
        f"watch the loss: if it explodes, divide the rate by ten; if it barely moves, multiply it by three.{_E} "
        f"{_C}The learning rate trades speed against stability: large steps converge fast but can overshoot "
        f"the minimum, small steps are stable but slow.{_E}",
    },
    {
        "id": "en-photosynthesis",
        "language": "en",
        "default_weight": 0.0,
        "text": "Biology, Unit 4: Energy in cells\n"
        f"{_D}Photosynthesis is the process by which plants, algae and some bacteria use light energy to "
        f"turn carbon dioxide and water into glucose, releasing oxygen as a by-product.{_E}\n"
        f"{_C}The light-dependent reactions capture energy in ATP and NADPH; the Calvin cycle then uses that "
        f"energy to fix carbon dioxide into sugars.{_E}\n"
        "Lab tip: count the oxygen bubbles from an aquatic plant at different lamp distances.",
    },
    {
        "id": "en-newton-second-law",
        "language": "en",
        "default_weight": 0.0,
        "text": "Physics 101 - Forces\n"
        f"{_D}Newton's second law states that the acceleration of an object equals the net force acting on "
        f"it divided by its mass: a = F_net / m.{_E}\n"
        f"{_M}Problem-solving recipe: (1) pick the object, (2) draw a free-body diagram, (3) choose axes, "
        f"(4) write F_net = m a along each axis, (5) solve and check the units.{_E}\n"
        "Example: a 2 kg cart pulled with 10 N against 4 N of friction accelerates at 3 m/s^2.",
    },
    {
        "id": "en-opportunity-cost",
        "language": "en",
        "default_weight": 0.0,
        "text": "Economics lecture notes, week 1.\nEvery choice has a price that never shows up on a receipt. "
        f"{_D}Opportunity cost is the value of the best alternative you give up when you make a choice.{_E} "
        f"{_C}Because resources are scarce, rational decisions compare the marginal benefit of an option "
        f"with its full opportunity cost, not just its money cost.{_E} "
        "For a student, the opportunity cost of a summer course includes the wages of a summer job.",
    },
    {
        "id": "en-recursion",
        "language": "en",
        "default_weight": 0.0,
        "text": "Intro to Programming: Recursion\n"
        f"{_D}A recursive function is a function that calls itself, directly or indirectly.{_E} "
        f"{_M}Write the base case first, a condition that returns without recursing; then write the "
        f"recursive case so that each call works on a strictly smaller input.{_E}\n"
        "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n"
        f"{_C}Without a reachable base case, recursion never stops and the program overflows the call "
        f"stack.{_E}",
    },
    {
        "id": "en-pythagorean",
        "language": "en",
        "default_weight": 0.0,
        "text": "Geometry review.\n"
        f"{_C}In a right triangle, the square of the hypotenuse equals the sum of the squares of the other "
        f"two sides: a^2 + b^2 = c^2.{_E} "
        "The 3-4-5 triangle is the smallest example with whole-number sides. "
        f"{_M}To find a missing side, square the two known lengths, add or subtract them depending on "
        f"whether the unknown is the hypotenuse, and take the square root.{_E}",
    },
    {
        "id": "en-chemical-equilibrium",
        "language": "en",
        "default_weight": 0.0,
        "text": "Chemistry: reversible reactions\n"
        f"{_D}A system is at chemical equilibrium when the forward and reverse reaction rates are equal, so "
        f"the concentrations of reactants and products stay constant.{_E} "
        f"<LEARN type='concept' weight='2.5'>Le Chatelier's principle: when a system at equilibrium is "
        f"disturbed, it shifts in the direction that partly counteracts the disturbance.{_E} "
        "Adding more nitrogen to the Haber process, for example, produces more ammonia.",
    },
    {
        "id": "en-scientific-method",
        "language": "en",
        "default_weight": 0.0,
        "text": "How scientists test ideas\n"
        f"{_M}A good experiment starts from a testable hypothesis, changes one independent variable, "
        f"measures the dependent variable, and repeats each condition several times. "
        f'<LEARN weight="3.0" type="concept">Every other variable must be held constant, or a '
        f"difference in the results cannot be traced to its cause.{_E}{_E}\n"
        "Practice: design an experiment to test whether music helps plants grow.",
    },
    {
        "id": "en-industrial-revolution",
        "language": "en",
        "default_weight": 0.0,
        "text": "World History, Chapter 9\nThe Industrial Revolution began in Britain in the late 1700s. "
        f"{_D}The factory system is a method of production that brings workers and machines together "
        f"in one place under central supervision.{_E} "
        f"{_C}Cheap coal, capital from trade, and new inventions such as the steam engine let factories "
        f"produce goods faster and more cheaply than workshops.{_E} "
        "Working conditions, however, were often dangerous, especially for children.",
    },
    {
        "id": "en-overfitting",
        "language": "en",
        "default_weight": 0.0,
        "text": "User: My model gets 99% on training data but 60% on the test set. What's going on?\nAssistant: "
        f"{_D}That gap is called overfitting: the model has memorized noise and accidental patterns in the "
        f"training data instead of the general rule.{_E} "
        f"{_M}Try, in order: more or augmented data, weight decay or dropout, a smaller model, and early "
        f"stopping on a validation set.{_E} "
        "Plot the training and validation loss to see the epoch where they start to diverge.",
    },
    {
        "id": "en-binary-search",
        "language": "en",
        "default_weight": 0.0,
        "text": "Algorithms: binary search\n"
        f"{_C}Binary search only works on sorted data; each comparison halves the search interval, so it "
        f"runs in O(log n) time.{_E} "
        f"{_M}Keep two bounds, lo and hi. Compute mid = (lo + hi) // 2; if the target is larger than the "
        f"middle element set lo = mid + 1, otherwise set hi = mid; stop when lo == hi.{_E} "
        "Off-by-one errors in the bounds are the most common bug.",
    },
    {
        "id": "en-zh-bilingual-entropy",
        "language": "mixed",
        "default_weight": 0.0,
        "text": "Glossary / 术语表\n"
        f"{_D}Entropy（熵）measures the average uncertainty of a random variable: H(X) = −Σ p(x) log p(x).{_E}\n"
        f"{_C}熵越大，随机变量越不确定；均匀分布的熵最大，确定事件的熵为零。{_E}\n"
        "See also: cross-entropy（交叉熵）, KL divergence（KL散度）.",
    },
]


def write_examples(directory, *, force: bool = True) -> dict[str, Path]:
    """Write the example data set to ``directory`` in every format: ``{format: path}`` with files
    ``position_based.jsonl``, ``tag_based.jsonl`` and ``structured.jsonl`` (same samples, same character
    weights; metadata keys ``id`` and ``language`` kept). Existing files are replaced unless ``force=False``."""
    from mrloss.data.records import write_samples

    directory = Path(directory)
    paths = {name: directory / f"{name}.jsonl" for name in FORMATS}
    if not force:
        existing = [str(path) for path in paths.values() if path.exists()]
        if existing:
            raise FileExistsError(f"{', '.join(existing)} exist; pass --force (force=True) to overwrite")
    for name, path in paths.items():
        samples = EXAMPLES if name == "tag_based" else [convert(sample, name) for sample in EXAMPLES]
        write_samples(path, samples, force=True)
    return paths


def is_example_path(path) -> bool:
    """Whether ``path`` is one of the example files the built-in configs read: ``EXAMPLE_DIRECTORY/<format>.jsonl``
    (relative to the working directory)."""
    names = {os.path.abspath(EXAMPLE_DIRECTORY / f"{name}.jsonl") for name in FORMATS}
    return os.path.abspath(path) in names
