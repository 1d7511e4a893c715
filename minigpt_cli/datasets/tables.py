"""The fixed vocabulary behind the built-in data: a bilingual dictionary, fact tables, story words.

Kept apart from the generator so the tables read as data. Everything here is a constant; the
generator (`builtin.py` and the family modules beside it) decides which entries go to the training
or the held-out split. Subjects are unique within each table and the dictionary is one-to-one in
both languages (a test checks it), so every question has exactly one right answer.
"""

from __future__ import annotations

# --- en <-> zh dictionary: (english, chinese). One word per side, no synonyms on either side. ---

ANIMALS: tuple[tuple[str, str], ...] = (
    ("cat", "猫"),
    ("dog", "狗"),
    ("bird", "鸟"),
    ("fish", "鱼"),
    ("horse", "马"),
    ("cow", "牛"),
    ("pig", "猪"),
    ("sheep", "羊"),
    ("duck", "鸭子"),
    ("chicken", "鸡"),
    ("rabbit", "兔子"),
    ("tiger", "老虎"),
    ("lion", "狮子"),
    ("elephant", "大象"),
    ("monkey", "猴子"),
    ("bear", "熊"),
    ("mouse", "老鼠"),
    ("snake", "蛇"),
    ("frog", "青蛙"),
    ("bee", "蜜蜂"),
    ("panda", "熊猫"),
)
FOOD: tuple[tuple[str, str], ...] = (
    ("apple", "苹果"),
    ("banana", "香蕉"),
    ("orange", "橙子"),
    ("grape", "葡萄"),
    ("rice", "米饭"),
    ("bread", "面包"),
    ("milk", "牛奶"),
    ("tea", "茶"),
    ("water", "水"),
    ("egg", "鸡蛋"),
    ("noodles", "面条"),
    ("cake", "蛋糕"),
    ("strawberry", "草莓"),
    ("watermelon", "西瓜"),
    ("coffee", "咖啡"),
    ("meat", "肉"),
)
COLOURS: tuple[tuple[str, str], ...] = (
    ("red", "红色"),
    ("blue", "蓝色"),
    ("green", "绿色"),
    ("yellow", "黄色"),
    ("black", "黑色"),
    ("white", "白色"),
    ("purple", "紫色"),
    ("brown", "棕色"),
    ("pink", "粉色"),
    ("grey", "灰色"),
)
NATURE: tuple[tuple[str, str], ...] = (
    ("sun", "太阳"),
    ("moon", "月亮"),
    ("star", "星星"),
    ("sky", "天空"),
    ("sea", "大海"),
    ("river", "河"),
    ("mountain", "山"),
    ("tree", "树"),
    ("flower", "花"),
    ("rain", "雨"),
    ("snow", "雪"),
    ("wind", "风"),
    ("cloud", "云"),
    ("fire", "火"),
)
THINGS: tuple[tuple[str, str], ...] = (
    ("book", "书"),
    ("pen", "笔"),
    ("table", "桌子"),
    ("chair", "椅子"),
    ("door", "门"),
    ("window", "窗户"),
    ("car", "汽车"),
    ("train", "火车"),
    ("boat", "船"),
    ("house", "房子"),
    ("bed", "床"),
    ("cup", "杯子"),
    ("phone", "电话"),
    ("hat", "帽子"),
    ("ball", "球"),
    ("umbrella", "雨伞"),
)
PEOPLE: tuple[tuple[str, str], ...] = (
    ("mother", "妈妈"),
    ("father", "爸爸"),
    ("sister", "姐姐"),
    ("brother", "哥哥"),
    ("friend", "朋友"),
    ("teacher", "老师"),
    ("student", "学生"),
    ("doctor", "医生"),
)
BODY: tuple[tuple[str, str], ...] = (
    ("hand", "手"),
    ("eye", "眼睛"),
    ("ear", "耳朵"),
    ("nose", "鼻子"),
    ("mouth", "嘴"),
    ("head", "头"),
)
PLACES: tuple[tuple[str, str], ...] = (
    ("school", "学校"),
    ("park", "公园"),
    ("shop", "商店"),
    ("hospital", "医院"),
    ("library", "图书馆"),
    ("garden", "花园"),
)
NUMBERS_AND_TIME: tuple[tuple[str, str], ...] = (
    ("one", "一"),
    ("two", "二"),
    ("three", "三"),
    ("four", "四"),
    ("five", "五"),
    ("six", "六"),
    ("seven", "七"),
    ("eight", "八"),
    ("nine", "九"),
    ("ten", "十"),
    ("today", "今天"),
    ("tomorrow", "明天"),
    ("yesterday", "昨天"),
)

DICTIONARY: tuple[tuple[str, str], ...] = (
    ANIMALS + FOOD + COLOURS + NATURE + THINGS + PEOPLE + BODY + PLACES + NUMBERS_AND_TIME
)

# --- facts: four relations, each a table of (subject_en, answer_en, subject_zh, answer_zh). ---

CAPITALS: tuple[tuple[str, str, str, str], ...] = (
    ("France", "Paris", "法国", "巴黎"),
    ("Japan", "Tokyo", "日本", "东京"),
    ("China", "Beijing", "中国", "北京"),
    ("England", "London", "英国", "伦敦"),
    ("Germany", "Berlin", "德国", "柏林"),
    ("Italy", "Rome", "意大利", "罗马"),
    ("Spain", "Madrid", "西班牙", "马德里"),
    ("Russia", "Moscow", "俄罗斯", "莫斯科"),
    ("Canada", "Ottawa", "加拿大", "渥太华"),
    ("Egypt", "Cairo", "埃及", "开罗"),
    ("India", "New Delhi", "印度", "新德里"),
    ("Korea", "Seoul", "韩国", "首尔"),
    ("Thailand", "Bangkok", "泰国", "曼谷"),
    ("Australia", "Canberra", "澳大利亚", "堪培拉"),
    ("Greece", "Athens", "希腊", "雅典"),
    ("Portugal", "Lisbon", "葡萄牙", "里斯本"),
    ("Sweden", "Stockholm", "瑞典", "斯德哥尔摩"),
    ("Norway", "Oslo", "挪威", "奥斯陆"),
    ("Finland", "Helsinki", "芬兰", "赫尔辛基"),
    ("Poland", "Warsaw", "波兰", "华沙"),
    ("Turkey", "Ankara", "土耳其", "安卡拉"),
    ("Vietnam", "Hanoi", "越南", "河内"),
    ("Kenya", "Nairobi", "肯尼亚", "内罗毕"),
    ("Peru", "Lima", "秘鲁", "利马"),
    ("Ireland", "Dublin", "爱尔兰", "都柏林"),
    ("Austria", "Vienna", "奥地利", "维也纳"),
    ("Denmark", "Copenhagen", "丹麦", "哥本哈根"),
    ("Cuba", "Havana", "古巴", "哈瓦那"),
    ("Mexico", "Mexico City", "墨西哥", "墨西哥城"),
    ("Argentina", "Buenos Aires", "阿根廷", "布宜诺斯艾利斯"),
)

ANIMAL_SOUNDS: tuple[tuple[str, str, str, str], ...] = (
    ("dog", "woof", "狗", "汪汪"),
    ("cat", "meow", "猫", "喵喵"),
    ("cow", "moo", "牛", "哞哞"),
    ("sheep", "baa", "羊", "咩咩"),
    ("duck", "quack", "鸭子", "嘎嘎"),
    ("frog", "croak", "青蛙", "呱呱"),
    ("bee", "buzz", "蜜蜂", "嗡嗡"),
    ("mouse", "squeak", "老鼠", "吱吱"),
    ("pig", "oink", "猪", "哼哼"),
    ("snake", "hiss", "蛇", "嘶嘶"),
    ("owl", "hoot", "猫头鹰", "咕咕"),
    ("chicken", "cluck", "鸡", "咯咯"),
    ("wolf", "howl", "狼", "嗷呜"),
)

COLOURS_OF_THINGS: tuple[tuple[str, str, str, str], ...] = (
    ("the sky", "blue", "天空", "蓝色"),
    ("grass", "green", "草", "绿色"),
    ("snow", "white", "雪", "白色"),
    ("a banana", "yellow", "香蕉", "黄色"),
    ("coal", "black", "煤", "黑色"),
    ("a strawberry", "red", "草莓", "红色"),
    ("milk", "white", "牛奶", "白色"),
    ("a leaf", "green", "叶子", "绿色"),
    ("a lemon", "yellow", "柠檬", "黄色"),
    ("a cherry", "red", "樱桃", "红色"),
    ("a grape", "purple", "葡萄", "紫色"),
    ("chocolate", "brown", "巧克力", "棕色"),
    ("the sea", "blue", "大海", "蓝色"),
    ("a cloud", "white", "云", "白色"),
    ("a crow", "black", "乌鸦", "黑色"),
    ("a tomato", "red", "西红柿", "红色"),
    ("an elephant", "grey", "大象", "灰色"),
    ("a flamingo", "pink", "火烈鸟", "粉色"),
)

# Opposites are asked both ways ("opposite of hot" and "opposite of cold").
OPPOSITE_PAIRS: tuple[tuple[str, str, str, str], ...] = (
    ("hot", "cold", "热", "冷"),
    ("big", "small", "大", "小"),
    ("fast", "slow", "快", "慢"),
    ("happy", "sad", "高兴", "难过"),
    ("up", "down", "上", "下"),
    ("left", "right", "左", "右"),
    ("long", "short", "长", "短"),
    ("high", "low", "高", "低"),
    ("open", "closed", "开", "关"),
    ("early", "late", "早", "晚"),
    ("full", "empty", "满", "空"),
    ("hard", "soft", "硬", "软"),
    ("wet", "dry", "湿", "干"),
    ("thick", "thin", "厚", "薄"),
    ("strong", "weak", "强", "弱"),
    ("rich", "poor", "富", "穷"),
    ("light", "heavy", "轻", "重"),
    ("push", "pull", "推", "拉"),
    ("buy", "sell", "买", "卖"),
    ("win", "lose", "赢", "输"),
    ("near", "far", "近", "远"),
    ("clean", "dirty", "干净", "脏"),
    ("inside", "outside", "里面", "外面"),
    ("come", "go", "来", "去"),
)

# --- words for the story grammar (not part of any task's answers). ---

NAMES_EN: tuple[str, ...] = (
    "Tom", "Mia", "Lily", "Ben", "Sam", "Anna", "Max", "Lucy", "Leo", "Emma",
    "Jack", "Rose", "Noah", "Zoe", "Finn", "Ella", "Owen", "Ruby", "Hugo", "Nina",
)  # fmt: skip
NAMES_ZH: tuple[str, ...] = (
    "小明", "小红", "小华", "小丽", "小刚", "小美", "小龙", "小雪", "小军", "小芳",
    "小强", "小玲", "小东", "小月", "小林", "小云", "小杰", "小静", "小宇", "小琪",
)  # fmt: skip

# (english, chinese) pairs whose Chinese needs no measure word in "喜欢X" / "看见了X".
STORY_PLACES: tuple[tuple[str, str], ...] = (
    ("park", "公园"),
    ("school", "学校"),
    ("shop", "商店"),
    ("library", "图书馆"),
    ("garden", "花园"),
    ("farm", "农场"),
    ("beach", "海边"),
    ("forest", "森林"),
    ("river", "河边"),
    ("market", "市场"),
    ("zoo", "动物园"),
    ("kitchen", "厨房"),
)
STORY_ANIMALS: tuple[tuple[str, str, str], ...] = (
    # english, chinese, measure word
    ("cat", "猫", "只"),
    ("dog", "狗", "只"),
    ("bird", "鸟", "只"),
    ("rabbit", "兔子", "只"),
    ("duck", "鸭子", "只"),
    ("frog", "青蛙", "只"),
    ("fox", "狐狸", "只"),
    ("horse", "马", "匹"),
    ("fish", "鱼", "条"),
    ("bear", "熊", "只"),
    ("monkey", "猴子", "只"),
    ("owl", "猫头鹰", "只"),
)
STORY_THINGS: tuple[tuple[str, str, str], ...] = (
    ("ball", "球", "个"),
    ("book", "书", "本"),
    ("kite", "风筝", "个"),
    ("hat", "帽子", "顶"),
    ("box", "盒子", "个"),
    ("cake", "蛋糕", "块"),
    ("apple", "苹果", "个"),
    ("map", "地图", "张"),
    ("cup", "杯子", "个"),
    ("umbrella", "雨伞", "把"),
    ("flower", "花", "朵"),
    ("key", "钥匙", "把"),
)
STORY_ADJECTIVES: tuple[tuple[str, str], ...] = (
    ("little", "小小"),
    ("big", "大大"),
    ("red", "红色"),
    ("blue", "蓝色"),
    ("green", "绿色"),
    ("yellow", "黄色"),
    ("white", "白色"),
    ("black", "黑色"),
    ("funny", "好玩"),
    ("pretty", "漂亮"),
    ("old", "旧旧"),
    ("shiny", "亮晶晶"),
)
# Adjectives for animals: all but the last two, which only fit things ("旧旧的猴子" is wrong).
STORY_ANIMAL_ADJECTIVES: tuple[tuple[str, str], ...] = STORY_ADJECTIVES[:-2]
STORY_FEELINGS: tuple[tuple[str, str], ...] = (
    ("happy", "高兴"),
    ("sad", "难过"),
    ("surprised", "惊讶"),
    ("tired", "累"),
    ("excited", "激动"),
    ("scared", "害怕"),
    ("proud", "自豪"),
    ("calm", "平静"),
)
# Feelings that fit a character who lost something or has nothing.
STORY_SAD_FEELINGS: tuple[tuple[str, str], ...] = (
    ("sad", "难过"),
    ("worried", "担心"),
    ("upset", "伤心"),
    ("lonely", "孤单"),
)
STORY_TIMES: tuple[tuple[str, str], ...] = (
    ("One morning", "一天早上"),
    ("One afternoon", "一天下午"),
    ("One evening", "一天晚上"),
    ("Last summer", "去年夏天"),
    ("On a sunny day", "在一个晴天"),  # times from here on say the weather themselves
    ("On a rainy day", "在一个下雨天"),
    ("One winter day", "冬天的一天"),
    ("Long ago", "很久以前"),
)
STORY_WEATHER: tuple[tuple[str, str], ...] = (
    ("The sun was warm.", "太阳暖暖的。"),
    ("The wind was cold.", "风很冷。"),
    ("It started to rain.", "天开始下雨了。"),
    ("The sky was clear and blue.", "天空又蓝又干净。"),
    ("Snow fell softly.", "雪轻轻地落下来。"),
    ("Clouds moved across the sky.", "云在天上慢慢地飘。"),
)
STORY_ENDINGS: tuple[tuple[str, str], ...] = (
    ("went home together", "一起回家了"),
    ("became good friends", "成了好朋友"),
    ("laughed and played until dinner", "一直笑着玩到吃晚饭"),
    ("shared the cake", "一起分享了蛋糕"),
    ("promised to meet again tomorrow", "约好明天再见面"),
    ("sang a song on the way home", "在回家的路上唱起了歌"),
    ("told the story to their mother", "把这件事告诉了妈妈"),
)
