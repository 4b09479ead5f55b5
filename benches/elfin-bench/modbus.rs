//! Scenario 8: what a SCADA master feels through a tunnel. Modbus RTU function 3
//! (read holding registers) polls, one outstanding, the master on a client connection
//! and the slave on a device connection, against the relay in the same run. Every
//! request and response is a real RTU frame (random slave, address and count, random
//! register values, CRC-16/MODBUS), checked byte by byte in both directions. About
//! 1 % of frames end in a byte that could start the sender's next header, and those
//! wait for the header hold: this is where it shows.

use std::time::Instant;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::gateway::Gateway;
use crate::net::percentile;
use crate::report::{Row, Target};
use crate::tunnel::alternating;

/// A poll slower than this is one a master notices.
const SLOW_MS: f64 = 5.0;

/// CRC-16/MODBUS (reflected polynomial 0xA001, initial 0xFFFF), low byte first on
/// the wire.
fn crc16(frame: &[u8]) -> [u8; 2] {
    let mut crc: u16 = 0xFFFF;
    for &byte in frame {
        crc ^= u16::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xA001
            } else {
                crc >> 1
            };
        }
    }
    crc.to_le_bytes()
}

fn with_crc(mut frame: Vec<u8>) -> Vec<u8> {
    let crc = crc16(&frame);
    frame.extend_from_slice(&crc);
    frame
}

/// FC3 exchange number `i`: the request and the slave's response with random register
/// values (the same for the gateway and the relay).
fn fc3_poll(i: usize) -> (Vec<u8>, Vec<u8>) {
    let rng = &mut StdRng::seed_from_u64(i as u64);
    let slave: u8 = rng.random_range(1..=247);
    let start: u16 = rng.random();
    let count: u16 = rng.random_range(1..=125);
    let mut request = vec![slave, 0x03];
    request.extend_from_slice(&start.to_be_bytes());
    request.extend_from_slice(&count.to_be_bytes());
    let mut response = vec![slave, 0x03, (2 * count) as u8];
    response.extend((0..2 * count).map(|_| rng.random::<u8>()));
    (with_crc(request), with_crc(response))
}

pub async fn modbus_poll(gw: &Gateway, full: bool) -> Vec<Row> {
    // The Modbus spec's example: read 3 registers from 0x006B of slave 0x11.
    let example = with_crc(vec![0x11, 0x03, 0x00, 0x6B, 0x00, 0x03]);
    assert_eq!(example[6..], [0x76, 0x87], "CRC-16/MODBUS");
    let count = if full { 50_000 } else { 5_000 };
    let started = Instant::now();
    let (gateway, base) = alternating(gw, count, false, fc3_poll).await;
    let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len() as f64;
    let slow = |s: &[f64]| {
        100.0 * s.iter().filter(|&&us| us > SLOW_MS * 1e3).count() as f64 / s.len() as f64
    };
    let (mean_gw, mean_base) = (mean(&gateway), mean(&base));
    let (slow_gw, slow_base) = (slow(&gateway), slow(&base));
    let ms = |us: f64| us / 1e3;
    let label = format!("{count} FC3 polls");
    let rows = vec![
        Row::new(
            "modbus-poll",
            format!("mean, {label}"),
            "ms",
            ms(mean_gw),
            Some(ms(mean_base)),
            Target::RatioAtMost(1.3),
        ),
        Row::new(
            "modbus-poll",
            "p50",
            "ms",
            ms(percentile(&gateway, 0.5)),
            Some(ms(percentile(&base, 0.5))),
            Target::None,
        ),
        Row::new(
            "modbus-poll",
            "p99",
            "ms",
            ms(percentile(&gateway, 0.99)),
            Some(ms(percentile(&base, 0.99))),
            Target::AtMostBaselinePlus(2.0),
        ),
        Row::new(
            "modbus-poll",
            format!("polls over {SLOW_MS} ms"),
            "%",
            slow_gw,
            Some(slow_base),
            Target::AtMost(0.0),
        ),
    ];
    eprintln!("  ({:.1} s of polls)", started.elapsed().as_secs_f64());
    rows
}
