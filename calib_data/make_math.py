"""Writes math_drills.txt: worked arithmetic, algebra, geometry and probability problems in English and Chinese.

Seeded templates with computed answers (every number is checked by the code that prints it). Run from the repo root:
`python calib_data/make_math.py`. The output is committed; re-running reproduces it byte for byte.
"""

import math
import random
from fractions import Fraction
from pathlib import Path

R = random.Random(20241122)
NAMES_EN = ["Alice", "Ben", "Chen", "Dara", "Elif", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kemi", "Luca"]
NAMES_ZH = ["小明", "小红", "王老师", "李阿姨", "张师傅", "小刚", "陈同学", "刘叔叔", "赵奶奶", "孙经理"]
ITEMS_EN = [("notebook", "notebooks"), ("pencil", "pencils"), ("apple", "apples"), ("ticket", "tickets"), ("cup", "cups")]
ITEMS_ZH = ["笔记本", "铅笔", "苹果", "电影票", "杯子", "面包", "练习册"]


def shopping():
    a, b = R.randint(3, 12), R.randint(2, 9)
    pa, pb = R.randint(2, 30), R.randint(5, 60)
    paid = (a * pa + b * pb) // 50 * 50 + 50
    total = a * pa + b * pb
    (ia, ias), (ib, ibs) = R.sample(ITEMS_EN, 2)
    za, zb = R.sample(ITEMS_ZH, 2)
    yield (f"{R.choice(NAMES_EN)} buys {a} {ias} at {pa} yuan each and {b} {ibs} at {pb} yuan each, and pays with "
           f"{paid} yuan. How much change is due?\n"
           f"Cost of the {ias}: {a} × {pa} = {a * pa} yuan.\nCost of the {ibs}: {b} × {pb} = {b * pb} yuan.\n"
           f"Total: {a * pa} + {b * pb} = {total} yuan.\nChange: {paid} - {total} = {paid - total} yuan.")
    yield (f"{R.choice(NAMES_ZH)}买了 {a} 个{za}，每个 {pa} 元，又买了 {b} 个{zb}，每个 {pb} 元，付了 {paid} 元，应找回多少元？\n"
           f"{za}：{a} × {pa} = {a * pa}（元）\n{zb}：{b} × {pb} = {b * pb}（元）\n"
           f"一共：{a * pa} + {b * pb} = {total}（元）\n找回：{paid} - {total} = {paid - total}（元）\n答：应找回 {paid - total} 元。")


def linear():
    x = R.randint(-12, 15)
    a = R.choice([2, 3, 4, 5, 6, 7, 9])
    b = R.randint(-20, 20)
    c = a * x + b
    sb = f"+ {b}" if b >= 0 else f"- {-b}"
    yield (f"Solve {a}x {sb} = {c}.\n{'Subtract' if b >= 0 else 'Add'} {abs(b)} on both sides: {a}x = {c - b}.\n"
           f"Divide by {a}: x = {c - b} / {a} = {x}.\nCheck: {a} × ({x}) {sb} = {c}. ✓")
    yield (f"解方程 {a}x {sb} = {c}。\n移项：{a}x = {c} {'-' if b >= 0 else '+'} {abs(b)} = {c - b}\n"
           f"两边同除以 {a}：x = {x}\n检验：{a} × ({x}) {sb} = {c}，所以 x = {x} 是方程的解。")


def percent():
    price = R.randint(8, 90) * 10
    off = R.choice([10, 15, 20, 25, 30, 40])
    new = price * (100 - off) // 100 if price * (100 - off) % 100 == 0 else price * (100 - off) / 100
    yield (f"A jacket costs {price} yuan and is on sale at {off}% off. What is the sale price?\n"
           f"Discount: {price} × {off}% = {price * off / 100:g} yuan.\nSale price: {price} - {price * off / 100:g} = {new:g} yuan.\n"
           f"Equivalently {price} × {(100 - off) / 100:g} = {new:g}.")
    yield (f"一件商品原价 {price} 元，打 {(100 - off) // 10 if off % 10 == 0 else (100 - off) / 10:g} 折出售，现价多少元？便宜了多少元？\n"
           f"现价：{price} × {(100 - off) / 100:g} = {new:g}（元）\n便宜：{price} - {new:g} = {price * off / 100:g}（元）")


def triangle():
    a, b = R.choice([(3, 4), (5, 12), (8, 15), (6, 8), (9, 12), (7, 24), (20, 21)])
    c = math.isqrt(a * a + b * b)
    yield (f"A right triangle has legs {a} cm and {b} cm. Find the hypotenuse and the area.\n"
           f"By Pythagoras, c^2 = {a}^2 + {b}^2 = {a * a} + {b * b} = {c * c}, so c = √{c * c} = {c} cm.\n"
           f"Area = ½ × {a} × {b} = {a * b / 2:g} cm². Perimeter = {a} + {b} + {c} = {a + b + c} cm.")
    yield (f"直角三角形的两条直角边分别是 {a} 厘米和 {b} 厘米，求斜边长和面积。\n"
           f"由勾股定理：c² = {a}² + {b}² = {a * a} + {b * b} = {c * c}，c = {c}（厘米）\n"
           f"面积 = {a} × {b} ÷ 2 = {a * b / 2:g}（平方厘米）")


def circle():
    r = R.randint(2, 15)
    yield (f"Find the circumference and area of a circle of radius {r} m (use π ≈ 3.14).\n"
           f"C = 2πr = 2 × 3.14 × {r} = {2 * 3.14 * r:.2f} m.\nA = πr² = 3.14 × {r}² = 3.14 × {r * r} = {3.14 * r * r:.2f} m².")
    yield (f"一个圆形花坛的半径是 {r} 米，它的周长和面积各是多少？（π 取 3.14）\n"
           f"周长：2 × 3.14 × {r} = {2 * 3.14 * r:.2f}（米）\n面积：3.14 × {r}² = {3.14 * r * r:.2f}（平方米）")


def probability():
    red, blue, green = R.randint(2, 9), R.randint(2, 9), R.randint(1, 6)
    n = red + blue + green
    p_red = Fraction(red, n)
    p_two = Fraction(red, n) * Fraction(red - 1, n - 1)
    yield (f"A bag holds {red} red, {blue} blue and {green} green marbles. One is drawn at random.\n"
           f"P(red) = {red}/{n}" + (f" = {p_red}" if p_red.denominator != n else "") + f" ≈ {float(p_red):.3f}.\n"
           f"If two are drawn without replacement, P(both red) = {red}/{n} × {red - 1}/{n - 1} = {p_two} ≈ {float(p_two):.4f}.")
    yield (f"袋子里有 {red} 个红球、{blue} 个蓝球和 {green} 个绿球，任意摸出一个，摸到红球的概率是多少？\n"
           f"总数：{red} + {blue} + {green} = {n}\nP(红) = {red}/{n}" + (f" = {p_red}" if p_red.denominator != n else "") +
           f"\n不放回地连摸两个都是红球的概率：{red}/{n} × {red - 1}/{n - 1} = {p_two}")


def speed():
    v1, v2 = R.randint(40, 90), R.randint(40, 90)
    t = R.choice([1.5, 2, 2.5, 3, 4])
    d = (v1 + v2) * t
    yield (f"Two cars start {d:g} km apart and drive towards each other at {v1} km/h and {v2} km/h. When do they meet?\n"
           f"Closing speed: {v1} + {v2} = {v1 + v2} km/h.\nTime: {d:g} ÷ {v1 + v2} = {t:g} h.\n"
           f"The first car covers {v1} × {t:g} = {v1 * t:g} km, the second {v2 * t:g} km.")
    yield (f"甲、乙两地相距 {d:g} 千米，两辆汽车同时从两地相对开出，速度分别是每小时 {v1} 千米和 {v2} 千米，几小时后相遇？\n"
           f"速度和：{v1} + {v2} = {v1 + v2}（千米/时）\n相遇时间：{d:g} ÷ {v1 + v2} = {t:g}（小时）")


def interest():
    p = R.randint(1, 20) * 1000
    r = R.choice([2, 3, 4, 5, 6])
    n = R.randint(2, 6)
    fv = p * (1 + r / 100) ** n
    yield (f"{p} yuan is invested at {r}% a year, compounded yearly, for {n} years. What is it worth?\n"
           f"FV = P(1 + r)^n = {p} × 1.{r:02d}^{n} = {p} × {(1 + r / 100) ** n:.4f} ≈ {fv:.2f} yuan.\n"
           f"Simple interest would give {p} × (1 + {n} × {r / 100:g}) = {p * (1 + n * r / 100):.2f} yuan instead.")
    yield (f"把 {p} 元存入银行，年利率 {r}%，按年复利计算，{n} 年后本息合计多少元？\n"
           f"本息和 = {p} × (1 + {r}%)^{n} = {p} × {(1 + r / 100) ** n:.4f} ≈ {fv:.2f}（元）\n"
           f"利息 ≈ {fv - p:.2f} 元。")


def fractions():
    a, b = Fraction(R.randint(1, 7), R.randint(2, 9)), Fraction(R.randint(1, 7), R.randint(2, 9))
    yield (f"Compute {a} + {b} and {a} × {b}.\n"
           f"Common denominator: {a} + {b} = {a.numerator * b.denominator}/{a.denominator * b.denominator} + "
           f"{b.numerator * a.denominator}/{a.denominator * b.denominator} = {a + b}.\n"
           f"Product: ({a.numerator} × {b.numerator}) / ({a.denominator} × {b.denominator}) = {a * b}.")
    yield (f"计算：{a} + {b} = ？ {a} ÷ {b} = ？\n通分后相加：{a + b}\n除以一个数等于乘它的倒数：{a} × {1 / b} = {a / b}")


def sequence():
    a1, d, n = R.randint(1, 20), R.randint(2, 9), R.randint(8, 40)
    an = a1 + (n - 1) * d
    s = n * (a1 + an) // 2 if n * (a1 + an) % 2 == 0 else n * (a1 + an) / 2
    yield (f"An arithmetic sequence starts {a1}, {a1 + d}, {a1 + 2 * d}, ... Find term number {n} and the sum of the first {n} terms.\n"
           f"a_n = a_1 + (n - 1)d = {a1} + {n - 1} × {d} = {an}.\nS_n = n(a_1 + a_n)/2 = {n} × ({a1} + {an}) / 2 = {s:g}.")
    yield (f"等差数列 {a1}，{a1 + d}，{a1 + 2 * d}，…… 的第 {n} 项是多少？前 {n} 项的和是多少？\n"
           f"公差 d = {d}，a_{n} = {a1} + ({n} - 1) × {d} = {an}\nS_{n} = {n} × ({a1} + {an}) ÷ 2 = {s:g}")


def units():
    km = R.randint(2, 50)
    kg = R.randint(2, 80)
    c = R.randint(-10, 40)
    yield (f"Convert {km} km to miles, {kg} kg to pounds and {c} °C to Fahrenheit.\n"
           f"{km} km × 0.6214 = {km * 0.6214:.2f} miles.\n{kg} kg × 2.2046 = {kg * 2.2046:.2f} lb.\n"
           f"°F = °C × 9/5 + 32 = {c} × 1.8 + 32 = {c * 1.8 + 32:g} °F.")
    yield (f"单位换算：{km} 千米 = {km * 1000} 米；{kg} 千克 = {kg * 1000} 克 = {kg * 2} 斤；"
           f"{c} 摄氏度 = {c} × 1.8 + 32 = {c * 1.8 + 32:g} 华氏度。")


def quadratic():
    r1, r2 = R.randint(-9, 9), R.randint(-9, 9)
    b, c = -(r1 + r2), r1 * r2
    disc = b * b - 4 * c
    fmt = lambda v, s: (f" + {v}{s}" if v > 0 else f" - {-v}{s}" if v < 0 else "")
    yield (f"Solve x²{fmt(b, 'x')}{fmt(c, '')} = 0.\nDiscriminant Δ = b² - 4ac = {b}² - 4 × 1 × ({c}) = {disc}.\n"
           f"x = (-b ± √Δ) / 2 = ({-b} ± {math.isqrt(disc)}) / 2, so x = {max(r1, r2)} or x = {min(r1, r2)}.\n"
           f"Check by factoring: (x{fmt(-r1, '')})(x{fmt(-r2, '')}) = 0.")
    yield (f"解一元二次方程 x²{fmt(b, 'x')}{fmt(c, '')} = 0。\n判别式 Δ = {b}² - 4 × ({c}) = {disc}\n"
           f"x₁ = {max(r1, r2)}，x₂ = {min(r1, r2)}\n由韦达定理验证：x₁ + x₂ = {r1 + r2}，x₁x₂ = {c}。")


def average():
    scores = [R.randint(55, 100) for _ in range(R.randint(4, 7))]
    total = sum(scores)
    mean = total / len(scores)
    srt = sorted(scores)
    mid = len(srt) // 2
    median = srt[mid] if len(srt) % 2 else (srt[mid - 1] + srt[mid]) / 2
    yield (f"Test scores: {', '.join(map(str, scores))}. Find the mean and the median.\n"
           f"Sum = {' + '.join(map(str, scores))} = {total}; mean = {total} / {len(scores)} = {mean:.2f}.\n"
           f"Sorted: {', '.join(map(str, srt))}; median = {median:g}.")
    yield (f"某小组 {len(scores)} 名同学的成绩分别是 {'、'.join(map(str, scores))}，求平均分和中位数。\n"
           f"总分 = {total}，平均分 = {total} ÷ {len(scores)} ≈ {mean:.2f}\n从小到大排列：{'，'.join(map(str, srt))}，中位数是 {median:g}。")


def work():
    a, b = R.choice([(6, 12), (10, 15), (12, 24), (8, 24), (20, 30), (9, 18), (15, 10)])
    t = Fraction(a * b, a + b)
    yield (f"One pipe fills a tank in {a} hours, another in {b} hours. How long do both take together?\n"
           f"Rates: 1/{a} + 1/{b} = {Fraction(1, a) + Fraction(1, b)} of the tank per hour.\n"
           f"Time = 1 ÷ {Fraction(1, a) + Fraction(1, b)} = {t} hours" + (f" = {float(t):g} hours." if t.denominator != 1 else "."))
    yield (f"一项工程，甲队单独做要 {a} 天完成，乙队单独做要 {b} 天完成，两队合作需要几天？\n"
           f"工作效率和：1/{a} + 1/{b} = {Fraction(1, a) + Fraction(1, b)}\n合作时间：1 ÷ {Fraction(1, a) + Fraction(1, b)} = {t}（天）")


TEMPLATES = [shopping, linear, percent, triangle, circle, probability, speed, interest, fractions, sequence, units,
             quadratic, average, work]


def main(n_rounds: int = 17) -> None:
    docs = []
    for _ in range(n_rounds):
        for t in TEMPLATES:
            docs.extend(t())
    R.shuffle(docs)
    out = Path(__file__).with_name("math_drills.txt")
    out.write_text("\n<|doc|>\n".join(docs) + "\n", encoding="utf-8")
    print(f"{out}: {len(docs)} documents, {sum(map(len, docs))} characters")


if __name__ == "__main__":
    main()
