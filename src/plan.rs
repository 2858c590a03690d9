//! Request planning: which Modbus reads fetch a group of points.
//!
//! Points of one device that share a poll interval are coalesced into as few read requests as
//! the protocol allows: points in the same table are merged when they are contiguous or separated
//! by at most `max_gap` unused addresses, and a request never exceeds the table's limit (125
//! registers, 2000 bits). Pure functions; `config` calls them once at load and `check` prints the
//! result.

use crate::mapping::Point;
use crate::modbus::ReadRequest;

/// Plans the reads for `points[i]` for every `i` in `members`.
///
/// `max_gap` is the largest number of unused addresses a request may read over to join two
/// points; `max_registers` caps register requests below the protocol's 125 for devices that
/// accept less.
pub fn plan(
    points: &[Point],
    members: &[usize],
    max_gap: u16,
    max_registers: u16,
) -> Vec<ReadRequest> {
    let mut order: Vec<usize> = members.to_vec();
    order.sort_by_key(|&i| {
        (
            points[i].source.table,
            points[i].source.address,
            points[i].width(),
        )
    });

    let mut out: Vec<ReadRequest> = Vec::new();
    for i in order {
        let p = &points[i];
        let table = p.source.table;
        let limit = if table.is_bits() {
            table.max_per_request()
        } else {
            max_registers.clamp(1, table.max_per_request())
        };
        let start = p.source.address;
        let end = start as u32 + p.width() as u32 - 1;
        if let Some(cur) = out.last_mut() {
            let cur_end = cur.end() as u32;
            let joins = cur.table == table && start as u32 <= cur_end + 1 + max_gap as u32;
            let new_end = cur_end.max(end);
            if joins && new_end - (cur.start as u32) < limit as u32 {
                cur.count = (new_end - cur.start as u32 + 1) as u16;
                cur.points.push(i);
                continue;
            }
        }
        out.push(ReadRequest {
            table,
            start,
            count: p.width(),
            points: vec![i],
        });
    }
    out
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::mapping::DataType;
    use crate::modbus::Table;

    fn reg(table: Table, address: u16, dtype: DataType) -> Point {
        Point::new(&format!("{table:?}{address}"), table, address, dtype)
    }

    fn all(points: &[Point]) -> Vec<usize> {
        (0..points.len()).collect()
    }

    fn spans(reqs: &[ReadRequest]) -> Vec<(Table, u16, u16)> {
        reqs.iter().map(|r| (r.table, r.start, r.count)).collect()
    }

    #[test]
    fn contiguous_registers_become_one_request() {
        let points = vec![
            reg(Table::Holding, 100, DataType::F32),
            reg(Table::Holding, 102, DataType::U16),
            reg(Table::Holding, 103, DataType::U32),
        ];
        let reqs = plan(&points, &all(&points), 0, 125);
        assert_eq!(spans(&reqs), vec![(Table::Holding, 100, 5)]);
        assert_eq!(reqs[0].points, vec![0, 1, 2]);
    }

    #[test]
    fn a_gap_splits_unless_within_max_gap() {
        let points = vec![
            reg(Table::Input, 0, DataType::U16),
            reg(Table::Input, 4, DataType::U16), // 3 unused addresses between
        ];
        assert_eq!(
            spans(&plan(&points, &all(&points), 2, 125)),
            vec![(Table::Input, 0, 1), (Table::Input, 4, 1)]
        );
        assert_eq!(
            spans(&plan(&points, &all(&points), 3, 125)),
            vec![(Table::Input, 0, 5)]
        );
    }

    #[test]
    fn tables_are_never_mixed() {
        let points = vec![
            reg(Table::Holding, 0, DataType::U16),
            reg(Table::Input, 1, DataType::U16),
            reg(Table::Coil, 2, DataType::Bool),
            reg(Table::Discrete, 3, DataType::Bool),
        ];
        assert_eq!(plan(&points, &all(&points), 10, 125).len(), 4);
    }

    #[test]
    fn requests_never_exceed_125_registers() {
        // 130 consecutive u16 registers: 125 + 5.
        let points: Vec<Point> = (0..130)
            .map(|a| reg(Table::Holding, a, DataType::U16))
            .collect();
        let reqs = plan(&points, &all(&points), 0, 125);
        assert_eq!(
            spans(&reqs),
            vec![(Table::Holding, 0, 125), (Table::Holding, 125, 5)]
        );
        // A multi-register value is never split across requests.
        let points: Vec<Point> = (0..64)
            .map(|a| reg(Table::Holding, a * 2, DataType::F32))
            .collect();
        let reqs = plan(&points, &all(&points), 0, 125);
        assert_eq!(
            spans(&reqs),
            vec![(Table::Holding, 0, 124), (Table::Holding, 124, 4)]
        );
    }

    #[test]
    fn a_device_limit_below_125_is_respected() {
        let points: Vec<Point> = (0..10)
            .map(|a| reg(Table::Holding, a, DataType::U16))
            .collect();
        let reqs = plan(&points, &all(&points), 0, 4);
        assert_eq!(
            spans(&reqs),
            vec![
                (Table::Holding, 0, 4),
                (Table::Holding, 4, 4),
                (Table::Holding, 8, 2)
            ]
        );
    }

    #[test]
    fn bits_coalesce_up_to_2000() {
        let points: Vec<Point> = (0..2001)
            .map(|a| reg(Table::Coil, a, DataType::Bool))
            .collect();
        let reqs = plan(&points, &all(&points), 0, 125);
        assert_eq!(
            spans(&reqs),
            vec![(Table::Coil, 0, 2000), (Table::Coil, 2000, 1)]
        );
    }

    #[test]
    fn overlapping_points_share_registers() {
        let mut bit = reg(Table::Holding, 10, DataType::Bool);
        bit.bit = Some(3);
        let points = vec![
            reg(Table::Holding, 10, DataType::U16),
            bit,
            reg(Table::Holding, 9, DataType::U32),
        ];
        let reqs = plan(&points, &all(&points), 0, 125);
        assert_eq!(spans(&reqs), vec![(Table::Holding, 9, 2)]);
        assert_eq!(reqs[0].points.len(), 3);
    }

    #[test]
    fn only_the_members_are_planned() {
        let points = vec![
            reg(Table::Holding, 0, DataType::U16),
            reg(Table::Holding, 1, DataType::U16),
        ];
        let reqs = plan(&points, &[1], 0, 125);
        assert_eq!(spans(&reqs), vec![(Table::Holding, 1, 1)]);
        assert_eq!(reqs[0].points, vec![1]);
    }
}
