"""Draw the Vision page's example images (made for this project; CC0). `python assets/make_examples.py`"""
import os

from PIL import Image, ImageDraw

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "examples")


def main():
    os.makedirs(HERE, exist_ok=True)
    img = Image.new("RGB", (384, 256), "white")
    d = ImageDraw.Draw(img)
    d.ellipse((20, 60, 140, 180), fill=(220, 30, 30))
    d.rectangle((160, 60, 260, 180), fill=(30, 90, 220))
    d.polygon([(290, 180), (330, 60), (370, 180)], fill=(40, 170, 60))
    img.save(os.path.join(HERE, "shapes.png"))
    img = Image.new("RGB", (384, 256), "white")
    d = ImageDraw.Draw(img)
    for i, (h, c) in enumerate([(60, "orange"), (180, "purple"), (110, "teal"), (30, "gray")]):
        d.rectangle((40 + i * 80, 230 - h, 100 + i * 80, 230), fill=c)
        d.text((60 + i * 80, 235), "ABCD"[i], fill="black")
    img.save(os.path.join(HERE, "chart.png"))
    img = Image.new("RGB", (384, 256), (40, 120, 40))
    d = ImageDraw.Draw(img)
    d.rectangle((60, 80, 324, 176), fill="white", outline="black", width=4)
    d.text((120, 110), "STOP: TURBO ZONE", fill="black", font_size=20)
    img.save(os.path.join(HERE, "sign.png"))


if __name__ == "__main__":
    main()
