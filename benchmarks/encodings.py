"""Measure how app_support.sniff_encoding reads generated CSV files, both ways:
East Asian text in its Windows code page, and Western text in cp1252, Latin-1
and cp1250, which must never be read as an East Asian code page.

Run by hand: python benchmarks/encodings.py. Prints a confusion table:
(language, written as, length, read as, text exactly as written) -> files.
"""
import collections
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import app_support as a  # noqa: E402

WORDS = {
 "French": "café élève garçon déjà où être naïve hôtel crème brûlée façade noël forêt château".split(),
 "German": "Straße Müller Größe Äpfel schön über Übung Öl Bäcker grün Fuß weiß Zürich".split(),
 "Spanish": "niño año señor está corazón información canción mañana pequeño árbol jamás".split(),
 "Portuguese": "ação informação não são coração também órgão pães cães avô irmã lições situação".split(),
 "Polish": "zażółć gęślą jaźń łódź źródło święty Kraków Gdańsk mąka ćma żółw".split(),
 "Czech": "příliš žluťoučký kůň úpěl ďábelské ódy Praha Brno řeka čaj šest".split(),
 "Japanese": "日本 東京 大阪 こんにちは ありがとう データ 株式会社 売上 合計 商品 名前 住所 電話 番号 さくら カタカナ".split(),
 "Chinese (simplified)": "中国 北京 上海 数据 销售 合计 产品 名称 地址 电话 号码 公司 我们 这个 是的 发展 经济".split(),
 "Chinese (traditional)": "臺灣 台北 資料 銷售 合計 產品 名稱 地址 電話 號碼 公司 我們 這個 發展 經濟 學校".split(),
 "Korean": "한국 서울 부산 데이터 판매 합계 제품 이름 주소 전화 번호 회사 우리 안녕하세요 감사합니다".split(),
 # Prose: mostly kana, some rarer (level 2) kanji, Latin words beside Japanese ones.
 "Japanese prose": ["鬱蒼とした森の奥に佇む祠", "蝋燭の灯りが揺らめいている", "新型のiPhoneを購入しました",
                    "明日は雨が降るでしょう", "吾輩は猫である", "どこで生れたかとんと見当がつかぬ", "Windows10へ更新します"],
}
ENCODINGS = {
 "French": ["cp1252", "latin-1", "utf-8"], "German": ["cp1252", "latin-1", "utf-8"],
 "Spanish": ["cp1252", "latin-1", "utf-8"], "Portuguese": ["cp1252", "latin-1", "utf-8"],
 "Polish": ["cp1250", "utf-8"], "Czech": ["cp1250", "utf-8"],
 "Japanese": ["cp932", "utf-8"], "Chinese (simplified)": ["gb18030", "utf-8"],
 "Chinese (traditional)": ["cp950", "utf-8"], "Korean": ["cp949", "utf-8"],
 "Japanese prose": ["cp932", "utf-8"],
}
def csv_text(rng, lang, rows):
    w = WORDS[lang]
    lines = ["id,name,city,amount"]
    for i in range(rows):
        lines.append(f"{i},{rng.choice(w)} {rng.choice(w)},{rng.choice(w)},{rng.randint(1,999)}.{rng.randint(0,99)}")
    return "\n".join(lines) + "\n"
rng = random.Random(22)
table = collections.Counter()
wrong = []
for lang, encs in ENCODINGS.items():
    for enc in encs:
        for size, rows in (("short", 1), ("short", 3), ("long", 200)):
            for trial in range(100 if size == "short" else 20):
                text = csv_text(rng, lang, rows)
                data = text.encode(enc)
                got = a.sniff_encoding(data[:8192])
                try:
                    ok = data.decode(got, a._decode_errors(got)) == text
                except UnicodeDecodeError:
                    ok = False
                table[(lang, enc, size, got, ok)] += 1
                if not ok and got != "cp1252":  # read as another language's code page
                    wrong.append((lang, enc, got, text[:60]))
for k, v in sorted(table.items()):
    print(k, v)
print(len(wrong), "read as another language's code page:", wrong[:10])
